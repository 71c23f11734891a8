package slurm

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

func TestParsers(t *testing.T) {
	if got := ParseJobIDs([]byte("12\n13_4\n\n12\n")); !slices.Equal(got, []string{"12", "13_4"}) {
		t.Errorf("ParseJobIDs = %q", got)
	}
	out := "PID      JOBID    STEPID   LOCALID GLOBALID\n23029    3        batch    0       0\n23031    3        0        0       0\n"
	if got := ParseListPIDs([]byte(out)); !slices.Equal(got, []int{23029, 23031}) {
		t.Errorf("ParseListPIDs = %v", got)
	}
	for in, want := range map[string]string{
		"NodeName=vm State=IDLE+DRAIN Reason=preemptd: aws terminate notice, machine goes at X [root@2026-12-06T19:56:02]": "preemptd: aws terminate notice, machine goes at X",
		"NodeName=vm State=IDLE Reason=(null)": "",
		"NodeName=vm State=IDLE":               "",
	} {
		if got := NodeReason([]byte(in)); got != want {
			t.Errorf("NodeReason(%q) = %q, want %q", in, got, want)
		}
	}
}

// script is a fake of Slurm's commands: each call is recorded, and answered
// from answers by its command name.
type script struct {
	calls   []string
	answers map[string]string
}

func (s *script) run(_ context.Context, name string, args ...string) ([]byte, error) {
	call := name + " " + strings.Join(args, " ")
	s.calls = append(s.calls, call)
	for prefix, out := range s.answers {
		if strings.HasPrefix(call, prefix) {
			if strings.HasPrefix(out, "ERR ") {
				return nil, fmt.Errorf("%s", strings.TrimPrefix(out, "ERR "))
			}
			return []byte(out), nil
		}
	}
	return nil, nil
}

// TestResumeOnlyItsOwnDrain: a withdrawn notice undoes the drain made for
// it, but not a drain someone else made since (another reason), nor one
// made for another notice.
func TestResumeOnlyItsOwnDrain(t *testing.T) {
	n := agent.Notice{Provider: "aws", Kind: agent.KindTerminate, ID: "i-1", Deadline: time.Now().Add(2 * time.Minute)}
	for _, tc := range []struct {
		name, reason string
		withdraw     agent.Notice
		resumed      bool
	}{
		{"own drain", "preemptd: aws terminate notice", n, true},
		{"drained by an administrator since", "bad DIMM", n, false},
		{"another notice withdrawn", "preemptd: aws terminate notice", agent.Notice{Provider: "aws", Kind: agent.KindRebalance, ID: "r"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc := &script{answers: map[string]string{"scontrol show node": "NodeName=n1 State=IDLE+DRAIN Reason=" + tc.reason + " [root@2026-12-06T00:00:00]"}}
			s := New(Config{Node: "n1", Drain: true, Requeue: true, Run: sc.run}, nil)
			if err := s.drain(t.Context(), n); err != nil {
				t.Fatal(err)
			}
			if err := s.Resume(t.Context(), tc.withdraw); err != nil {
				t.Fatal(err)
			}
			resumed := slices.Contains(sc.calls, "scontrol update nodename=n1 state=resume")
			if resumed != tc.resumed {
				t.Fatalf("resumed %v, want %v; calls %q", resumed, tc.resumed, sc.calls)
			}
			if !strings.Contains(sc.calls[0], "reason=preemptd: aws terminate notice, machine goes at ") {
				t.Fatalf("drain: %q", sc.calls[0])
			}
		})
	}
}

// TestSignalThenRequeue: the signal reaches every job on the node through
// scancel with the target's flag, their processes are reported for the
// wait, and the requeue (after the checkpoint step) names every job found
// on the node, one whose scancel failed too (the machine goes either way).
func TestSignalThenRequeue(t *testing.T) {
	sc := &script{answers: map[string]string{
		"squeue":                          "7\n8\n",
		"scontrol listpids 7":             "PID JOBID STEPID LOCALID GLOBALID\n101 7 batch 0 0\n",
		"scontrol listpids 8":             "PID JOBID STEPID LOCALID GLOBALID\n",
		"scancel --signal=USR1 --batch 8": "ERR scancel: error: Kill job error on job id 8: Invalid job id specified",
	}}
	s := New(Config{Node: "n1", Target: TargetBatch, Requeue: true, Run: sc.run}, nil)
	rep, err := Trainer{S: s}.Signal(t.Context(), "SIGUSR1")
	if err != nil || !slices.Equal(rep.PIDs, []int{101}) || len(rep.Problems) != 1 || !strings.Contains(rep.Sources[0], "slurm job 7") {
		t.Fatalf("report %+v, %v", rep, err)
	}
	if !slices.Contains(sc.calls, "squeue --noheader --nodelist=n1 --states=RUNNING,CONFIGURING,COMPLETING --format=%i") ||
		!slices.Contains(sc.calls, "scancel --signal=USR1 --batch 7") {
		t.Fatalf("calls %q", sc.calls)
	}
	if err := (Step{S: s}).Run(t.Context(), agent.Notice{}); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(sc.calls, "scontrol requeue 7") || !slices.Contains(sc.calls, "scontrol requeue 8") {
		t.Fatalf("requeue calls %q", sc.calls)
	}
}
