package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/fleet"
)

// cmdAdvise prints the checkpoint advice: the running daemon's, or, when
// none answers, one computed here from the store's records and the prior
// (with no measured save time).
func cmdAdvise(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("advise", "advise [--json] [--type TYPE] [--region REGION] [--config FILE]", stderr, false)
	asJSON := c.fs.Bool("json", false, "print the advice as JSON")
	typ := c.fs.String("type", "", "without a daemon: the instance type to advise for")
	region := c.fs.String("region", "", "without a daemon: its region")
	if err := c.parse(args); err != nil {
		return err
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	adv, err := agent.NewClient(cfg.Socket()).Advice(qctx, 0)
	cancel()
	source := "the running daemon (" + cfg.Socket() + ")"
	if errors.Is(err, agent.ErrNotRunning) {
		cm, err := readCommitter(&cfg, getenv)
		if err != nil {
			return err
		}
		l, err := fleet.Read(ctx, cm.Store, time.Time{})
		if err != nil {
			return fmt.Errorf("no daemon answers, and the store's records could not be read: %w", err)
		}
		inst := agent.Instance{Type: *typ, Region: *region}
		prior, basis := fleet.PriorFor(cfg.Advice.InterruptionsPerHour, nil, inst)
		a := advice.New(advice.Config{Min: cfg.Advice.MinInterval.D(), Max: cfg.Advice.MaxInterval.D(), Nodes: cfg.Job.Nodes}, time.Now(),
			advice.Estimate(prior, basis, fleet.Observations(l.Records, inst)))
		adv = a.Advice(time.Now())
		adv.CheckpointNow, adv.Request, adv.DueAt = false, 0, time.Time{}
		adv.Reason = "computed without a daemon: the save and upload times are not measured"
		source = "the store's event records (" + cm.Store.String() + "); no daemon answers on " + cfg.Socket()
	} else if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(adv)
	}
	printAdvice(stdout, adv, source)
	return nil
}

func printAdvice(w io.Writer, a advice.Advice, source string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	in := a.Inputs
	fmt.Fprintf(tw, "checkpoint every:\t%s\n", time.Duration(a.CheckpointEvery*float64(time.Second)).Round(time.Second))
	fmt.Fprintf(tw, "checkpoint now:\t%v\n", a.CheckpointNow)
	fmt.Fprintf(tw, "reason:\t%s\n", a.Reason)
	if !a.LastCheckpoint.IsZero() {
		fmt.Fprintf(tw, "last checkpoint:\t%s\n", a.LastCheckpoint.Format(time.RFC3339))
	}
	saves := fmt.Sprintf("%d measured", in.SaveMeasured)
	if in.SaveMeasured == 0 {
		saves = "not measured: the default"
	}
	fmt.Fprintf(tw, "save time C:\t%.1fs (%s)\n", in.SaveSeconds, saves)
	fmt.Fprintf(tw, "upload time:\t%.1fs\n", in.UploadSeconds)
	fmt.Fprintf(tw, "mean time between interruptions M:\t%.1f h (%s)\n", in.MTBIHours, in.Basis)
	fmt.Fprintf(tw, "notices that committed p:\t%.2f (of %d watched)\n", in.Committed, in.Watched)
	for _, r := range in.Risks {
		fmt.Fprintf(tw, "risk:\t%s %s since %s\n", r.Kind, r.Detail, r.At.Format(time.RFC3339))
	}
	fmt.Fprintf(tw, "formula:\t%s\n", strings.ReplaceAll(in.Formula, "; ", "\n\t"))
	fmt.Fprintf(tw, "source:\t%s\n", source)
	tw.Flush()
}
