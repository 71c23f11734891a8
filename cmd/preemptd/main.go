// Command preemptd keeps GPU work alive on spot and preemptible machines: it
// watches the cloud's termination notices, tells the training process and
// its deadline, and runs the emergency path before the machine goes.
package main

import (
	"context"
	"os"
	"os/signal"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}
