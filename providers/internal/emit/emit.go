// Package emit holds what every provider does the same way: hand a notice
// to the agent without blocking past cancellation, and shorten a foreign
// document for an error message.
package emit

import (
	"context"

	"github.com/preemptd/preemptd/agent"
)

// Send passes n on out unless ctx ends first.
func Send(ctx context.Context, out chan<- agent.Notice, n agent.Notice) {
	select {
	case out <- n:
	case <-ctx.Done():
	}
}

// Truncate shortens s to n bytes for a log or error message.
func Truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
