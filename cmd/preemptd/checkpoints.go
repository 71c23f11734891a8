package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/job"
)

// newCommitter opens the configured store for the run (creating a local
// one that does not exist yet: for the commands that write).
func newCommitter(cfg *config.Config, getenv func(string) string, log *slog.Logger) (*checkpoint.Committer, error) {
	return openCommitter(cfg, getenv, log, false)
}

// readCommitter opens the store for a command that only reads it (ls,
// restore, report, advise): it creates nothing, and a local store that does
// not exist is an error (wrapping storage.ErrNoStore) that says where it
// looked and how to point at the daemon's.
func readCommitter(cfg *config.Config, getenv func(string) string) (*checkpoint.Committer, error) {
	return openCommitter(cfg, getenv, nil, true)
}

func openCommitter(cfg *config.Config, getenv func(string) string, log *slog.Logger, readOnly bool) (*checkpoint.Committer, error) {
	st, err := storage.Open(cfg.StorageURL(), storage.Options{Endpoint: cfg.Storage.Endpoint, Region: cfg.Storage.Region,
		IMDSEndpoint: cfg.AWS.Endpoint, GCPMetadata: cfg.GCP.Endpoint, AzureIMDS: cfg.Azure.Endpoint, Getenv: getenv,
		Threads: uint(cfg.Storage.Threads), Checksum: cfg.Storage.Checksum, ReadOnly: readOnly})
	if errors.Is(err, storage.ErrNoStore) {
		where := "storage.url"
		if cfg.Storage.URL == "" {
			where = "state_dir " + cfg.StateDir + ", whose store/ folder is the default store"
		}
		return nil, fmt.Errorf("%w (from %s): nothing was ever uploaded there. If the daemon keeps its store elsewhere, "+
			"pass the daemon's --config, or --state-dir DIR", err, where)
	}
	if err != nil {
		return nil, usageError{err}
	}
	host, _ := os.Hostname()
	c := &checkpoint.Committer{Store: st, Run: cfg.Run(getenv), Instance: host, Keep: cfg.Checkpoint.Keep, Log: log}
	if p := cfg.Storage.SignKey; p != "" {
		if c.SignKey, err = checkpoint.LoadSignKey(p); err != nil {
			return nil, usageError{fmt.Errorf("storage.sign_key: %w", err)}
		}
	}
	if p := cfg.Storage.VerifyKey; p != "" {
		if c.VerifyKey, err = checkpoint.LoadVerifyKey(p); err != nil {
			return nil, usageError{fmt.Errorf("storage.verify_key: %w", err)}
		}
	}
	return c, nil
}

// runCommitter loads the configuration, names the run (--run over run_id)
// and opens its store.
func runCommitter(c *common, run string, getenv func(string) string) (config.Config, *checkpoint.Committer, error) {
	cfg, err := c.load(getenv)
	if err != nil {
		return cfg, nil, err
	}
	if run != "" {
		cfg.RunID = run
	}
	cm, err := readCommitter(&cfg, getenv)
	if errors.Is(err, storage.ErrNoStore) {
		// Nothing was ever committed there: for ls and restore that is a
		// fresh start (exit 4), said with where they looked.
		err = fmt.Errorf("%w: %w", checkpoint.ErrNothingCommitted, err)
	}
	return cfg, cm, err
}

func cmdLs(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("ls", "ls [--json] [--run RUN] [--config FILE]", stderr, false)
	asJSON := c.fs.Bool("json", false, "print the manifests as JSON")
	run := c.fs.String("run", "", "the run to list (default: run_id)")
	if err := c.parse(args); err != nil {
		return err
	}
	_, cm, err := runCommitter(c, *run, getenv)
	if err != nil {
		return err
	}
	lst, err := cm.Listing(ctx)
	if err != nil {
		return err
	}
	ms, latest := lst.Manifests, lst.Latest
	hidden := map[string]string{}
	for name, err := range lst.Hidden {
		hidden[name] = err.Error()
	}
	nodes, err := job.ReadMembers(ctx, cm.Store, cm.Run)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Run         string                `json:"run"`
			Latest      string                `json:"latest"`
			Checkpoints []checkpoint.Manifest `json:"checkpoints"`
			JobNodes    []job.Member          `json:"job_nodes,omitempty"`
			// Hidden are checkpoints left out because they fail verification.
			Hidden map[string]string `json:"hidden,omitempty"`
		}{cm.Run, latest, ms, nodes, hidden})
	}
	if len(hidden) > 0 {
		names := slices.Sorted(maps.Keys(hidden))
		fmt.Fprintf(stdout, "%d checkpoint(s) hidden because they fail verification (%s: %s); check storage.verify_key (or sign_key) against the key they were signed with\n",
			len(names), names[len(names)-1], hidden[names[len(names)-1]])
	}
	for _, n := range nodes {
		fmt.Fprintf(stdout, "job node %s: instance %s, host %s, registered %s, refreshed %s\n", n.Node, n.Instance, n.Host,
			n.StartedAt.Format(time.RFC3339), n.RefreshedAt.Format(time.RFC3339))
	}
	if len(ms) == 0 {
		fmt.Fprintf(stdout, "run %s has no committed checkpoint in %s\n", cm.Run, cm.Store)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "NAME\tSTEP\tLAYOUT\tFILES\tBYTES\tCOMMITTED\t\n")
	for _, m := range ms {
		mark := ""
		if m.Name == latest {
			mark = "latest"
		}
		if len(m.Parts) > 0 {
			var ps []string
			for _, p := range m.Parts {
				ps = append(ps, p.Node)
			}
			mark = strings.TrimSpace(mark + " parts: " + strings.Join(ps, ","))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%s\t%s\n", m.Name, m.Step, m.Layout, len(m.Files), m.Bytes,
			m.CommittedAt.Format(time.RFC3339), mark)
	}
	return tw.Flush()
}

func cmdUpload(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("upload", "upload [--config FILE] DIR", stderr, false)
	if err := c.parse(args); err != nil {
		return err
	}
	if c.fs.NArg() != 1 {
		return usagef("upload: give one checkpoint folder (or file)")
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	target, err := filepath.Abs(c.fs.Arg(0))
	if err != nil {
		return err
	}
	if _, err := os.Lstat(target); err != nil {
		return fmt.Errorf("upload: %s does not exist: give the path of one checkpoint, like ./checkpoints/step-100", target)
	}
	root, name := filepath.Dir(target), filepath.Base(target)
	cks, err := checkpoint.Scan(root, cfg.Checkpoint.Layout, 0, time.Now())
	if err != nil {
		return err
	}
	var ck *checkpoint.Checkpoint
	for i := range cks {
		if cks[i].Name == name {
			ck = &cks[i]
		}
	}
	if ck == nil {
		return fmt.Errorf("upload: %s is not a complete checkpoint of layout %q in %s (its marker is missing?)",
			name, cfg.Checkpoint.Layout, root)
	}
	cm, err := newCommitter(&cfg, getenv, nil)
	if err != nil {
		return err
	}
	res, err := cm.Commit(ctx, *ck)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "committed %s (run %s): %d files, %d bytes, %d sent, in %s\n", ck.Name, cm.Run,
		len(res.Manifest.Files), res.Manifest.Bytes, res.Manifest.SentBytes, res.Took.Round(time.Millisecond))
	return nil
}
