package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/fleet"
)

func cmdReport(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("report", "report [--since DUR] [--prices FILE] [--json] [--all] [--compact] [--config FILE]", stderr, false)
	since := c.fs.String("since", "", "only notices newer than this, e.g. 720h (default: all)")
	prices := c.fs.String("prices", "", "YAML file: instance type → {on_demand, spot} in $/h")
	asJSON := c.fs.Bool("json", false, "print the report as JSON")
	all := c.fs.Bool("all", false, "include simulated notices")
	compact := c.fs.Bool("compact", false, "also write the rollup of every past day read record by record (one object per day)")
	if err := c.parse(args); err != nil {
		return err
	}
	var from time.Time
	if *since != "" {
		d, err := config.ParseDuration(*since)
		if err != nil || d <= 0 {
			return usagef("--since: %q is not a duration like 720h", *since)
		}
		from = time.Now().Add(-d)
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	var p map[string]fleet.Price
	if *prices != "" {
		if p, err = fleet.LoadPrices(*prices); err != nil {
			return usageError{err}
		}
	}
	cm, err := readCommitter(&cfg, getenv)
	if err != nil {
		return err
	}
	l, err := fleet.Read(ctx, cm.Store, from)
	if err != nil {
		return err
	}
	if l.Bad > 0 {
		fmt.Fprintf(stderr, "preemptd: skipped %d unreadable event record(s)\n", l.Bad)
	}
	if *compact {
		days, n, err := fleet.Compact(ctx, cm.Store, l, time.Now())
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "preemptd: compacted %d day(s), %d record(s); %d day(s) were compacted already\n", days, n, l.Rollups)
	}
	rep := fleet.Build(l.Records, from, p, *all)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return fleet.Print(stdout, rep)
}
