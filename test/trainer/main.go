// Command trainer is the stand-in training process of preemptd's end-to-end
// tests and demo: it writes its PID, records every signal it receives (with
// the notice.json it found at that moment) as a JSON line, and exits on the
// fatal signal unless told to ignore it.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Record is one line of the signal log.
type Record struct {
	Signal string          `json:"signal"`
	At     time.Time       `json:"at"`
	PID    int             `json:"pid"`
	Notice json.RawMessage `json:"notice,omitempty"`
}

func main() {
	pidFile := flag.String("pid-file", "", "write the PID here")
	logPath := flag.String("log", "", "append a JSON line per signal here (default stdout)")
	notice := flag.String("notice", "", "notice.json to read when a signal arrives")
	exitOn := flag.String("exit-on", "SIGTERM", "comma-separated signals that end the process")
	ignore := flag.Bool("ignore", false, "ignore every signal it can (to test SIGKILL escalation)")
	flag.Parse()

	out := os.Stdout
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "trainer:", err)
			os.Exit(1)
		}
		out = f
	}
	exit := map[string]bool{}
	for _, s := range strings.Split(*exitOn, ",") {
		exit[strings.TrimSpace(strings.ToUpper(s))] = true
	}
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGHUP)
	if *pidFile != "" {
		if err := os.WriteFile(*pidFile, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "trainer:", err)
			os.Exit(1)
		}
	}
	fmt.Fprintf(os.Stderr, "trainer %d: training\n", os.Getpid())
	for s := range ch {
		rec := Record{Signal: unix.SignalName(s.(syscall.Signal)), At: time.Now(), PID: os.Getpid()}
		if *notice != "" {
			if b, err := os.ReadFile(*notice); err == nil && json.Valid(b) {
				rec.Notice = b
			}
		}
		b, _ := json.Marshal(rec)
		fmt.Fprintf(out, "%s\n", b)
		out.Sync()
		if exit[rec.Signal] && !*ignore {
			fmt.Fprintf(os.Stderr, "trainer %d: %s, checkpoint saved, exiting\n", os.Getpid(), rec.Signal)
			os.Exit(0)
		}
	}
}
