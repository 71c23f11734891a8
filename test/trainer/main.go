// Command trainer is the stand-in training process of preemptd's end-to-end
// tests and demo: it writes its PID, records every signal it receives (with
// the notice.json it found at that moment) as a JSON line, and exits on the
// fatal signal unless told to ignore it.
package main

import (
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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
	ckptDir := flag.String("ckpt-dir", "", "write torch-DCP-layout checkpoints here: step-1 at start, the next on the exit signal")
	ckptBytes := flag.Int64("ckpt-bytes", 8<<20, "bytes of shard data per checkpoint")
	dieMidSave := flag.Bool("die-mid-save", false, "on the exit signal, write half the shards and die without .metadata")
	saveDelay := flag.Duration("save-delay", 0, "time the save on the exit signal takes before its first byte")
	shards := flag.Int("ckpt-shards", 4, "shard files per checkpoint")
	keep := flag.Int("ckpt-unchanged", 0, "shards copied unchanged from the previous step (frozen weights)")
	saveEvery := flag.Duration("save-every", 0, "also save a checkpoint this often (periodic saves); the exit signal lets a save in progress finish, then saves once more")
	saveTime := flag.Duration("save-time", 0, "how long each save takes, spread over its shards")
	rank := flag.Int("rank", -1, "a multi-node job's rank: its shards are __<rank>_<i>.distcp, and only rank 0 (the coordinator) writes .metadata")
	peers := flag.String("peers", "", "rank 0: the other ranks' checkpoint folders (comma-separated); .metadata waits until each has saved the step, as DCP's collective save does")
	startStep := flag.Int("start-step", 1, "the step saved at start")
	flag.Parse()
	job = jobRole{rank: *rank}
	if *peers != "" {
		job.peers = strings.Split(*peers, ",")
	}
	shardPause = *saveTime / time.Duration(max(*shards, 1))

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
	step := *startStep
	if *ckptDir != "" {
		if err := saveDCP(*ckptDir, step, *ckptBytes, *shards, 0, false); err != nil {
			fmt.Fprintln(os.Stderr, "trainer:", err)
			os.Exit(1)
		}
	}
	var saveMu sync.Mutex // held for a whole save: the final one waits for a periodic one
	var stopping atomic.Bool
	if *ckptDir != "" && *saveEvery > 0 {
		go func() {
			for {
				time.Sleep(*saveEvery)
				saveMu.Lock()
				if stopping.Load() {
					saveMu.Unlock()
					return
				}
				step++
				if err := saveDCP(*ckptDir, step, *ckptBytes, *shards, *keep, false); err != nil {
					fmt.Fprintln(os.Stderr, "trainer:", err)
					os.Exit(1)
				}
				saveMu.Unlock()
			}
		}()
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
		if exit[rec.Signal] && !*ignore && *ckptDir != "" {
			stopping.Store(true)
			saveMu.Lock() // a periodic save in progress finishes first
			time.Sleep(*saveDelay)
			step++
			if err := saveDCP(*ckptDir, step, *ckptBytes, *shards, *keep, *dieMidSave); err != nil {
				fmt.Fprintln(os.Stderr, "trainer:", err)
				os.Exit(1)
			}
		}
		if exit[rec.Signal] && !*ignore {
			fmt.Fprintf(os.Stderr, "trainer %d: %s, checkpoint saved, exiting\n", os.Getpid(), rec.Signal)
			os.Exit(0)
		}
	}
}

// shardPause is the time each shard of a save takes (--save-time).
var shardPause time.Duration

// jobRole is this trainer's place in a multi-node job (rank -1: none).
type jobRole struct {
	rank  int
	peers []string
}

var job jobRole

// shardName is shard i's file name.
func shardName(i int) string {
	if job.rank < 0 {
		return fmt.Sprintf("__%d_0.distcp", i)
	}
	return fmt.Sprintf("__%d_%d.distcp", job.rank, i)
}

// finishJob ends a rank's share of a save: a rank other than 0 marks its
// shards written (a hidden file beside the checkpoints, which no layout
// reads); rank 0 waits for every peer's mark, then writes .metadata. It
// says whether this rank writes .metadata.
func finishJob(root string, step int) (bool, error) {
	done := fmt.Sprintf(".done-step-%d", step)
	if job.rank > 0 {
		return false, os.WriteFile(filepath.Join(root, done), nil, 0o644)
	}
	for _, p := range job.peers {
		for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(filepath.Join(p, done)); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return false, fmt.Errorf("peer %s never saved step %d", p, step)
			}
		}
	}
	return true, nil
}

// saveDCP writes a checkpoint the way torch.distributed.checkpoint does:
// shard files first, .metadata (through .metadata.tmp and a rename) last.
// Dying mid-save leaves half the shards and no .metadata.
func saveDCP(root string, step int, size int64, shards, unchanged int, die bool) error {
	dir := filepath.Join(root, fmt.Sprintf("step-%d", step))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range shards {
		name := shardName(i)
		if i < unchanged {
			b, err := os.ReadFile(filepath.Join(root, fmt.Sprintf("step-%d", step-1), name))
			if err == nil {
				if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
					return err
				}
				continue
			}
		}
		time.Sleep(shardPause)
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		for left := size / int64(shards); left > 0; left -= int64(len(buf)) {
			rand.Read(buf)
			n := min(left, int64(len(buf)))
			if _, err := f.Write(buf[:n]); err != nil {
				f.Close()
				return err
			}
		}
		if err := f.Close(); err != nil {
			return err
		}
		if die && i == shards/2 {
			fmt.Fprintf(os.Stderr, "trainer %d: dying in the middle of saving step-%d\n", os.Getpid(), step)
			os.Exit(3)
		}
	}
	if meta, err := finishJob(root, step); err != nil || !meta {
		if err == nil {
			fmt.Fprintf(os.Stderr, "trainer %d: saved rank %d's part of step-%d\n", os.Getpid(), job.rank, step)
		}
		return err
	}
	tmp := filepath.Join(dir, ".metadata.tmp")
	if err := os.WriteFile(tmp, []byte(fmt.Sprintf(`{"step":%d}`, step)), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, ".metadata")); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "trainer %d: saved step-%d (%d bytes)\n", os.Getpid(), step, size)
	return nil
}
