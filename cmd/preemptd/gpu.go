package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/gpu"
)

// cmdGPU prints the NVML snapshot; a machine without a GPU is not an error.
func cmdGPU(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("gpu", "gpu [--json]", stderr, false)
	asJSON := c.fs.Bool("json", false, "print the snapshot as JSON")
	if err := c.parse(args); err != nil {
		return err
	}
	r := gpu.Open(nil)
	defer r.Close()
	s := r.Snapshot(ctx)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	printGPUs(stdout, s)
	return nil
}

func printGPUs(w io.Writer, s agent.GPUSnapshot) {
	if !s.Available {
		fmt.Fprintf(w, "no GPU information: %s\n", s.Reason)
		return
	}
	fmt.Fprintf(w, "driver %s, CUDA %s, %d GPU(s)\n", s.Driver, s.CUDA, len(s.Devices))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tNAME\tMEMORY\tUTIL\tTEMP\tPOWER\tECC(U)\tTHROTTLE\tPROCESSES")
	for _, d := range s.Devices {
		procs := ""
		for i, p := range d.Processes {
			if i > 0 {
				procs += " "
			}
			procs += fmt.Sprintf("%d(%s,%dMiB)", p.PID, p.Name, p.MemoryUsed>>20)
		}
		fmt.Fprintf(tw, "%d\t%s\t%d/%d MiB\t%d%%\t%dC\t%.0fW\t%d\t%v\t%s\n", d.Index, d.Name, d.MemoryUsed>>20,
			d.MemoryTotal>>20, d.UtilGPU, d.TemperatureC, d.PowerW, d.ECCUncorrected, d.Throttle, procs)
	}
	tw.Flush()
}
