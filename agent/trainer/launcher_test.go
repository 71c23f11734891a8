package trainer

import (
	"regexp"
	"testing"
)

// TestWorkersPattern: the documented pattern matches torchrun's workers and
// not the launcher, whose command line also holds the script's path (the
// README's earlier advice, `train\.py`, matched both).
func TestWorkersPattern(t *testing.T) {
	launcherCmd := "/usr/bin/python3 /usr/bin/torchrun --nnodes 1 --nproc_per_node 2 --redirects 2 --tee 2 /work/train.py --epochs 3"
	worker := "/usr/bin/python3 -u /work/train.py --epochs 3"
	re := regexp.MustCompile(WorkersPattern("train.py"))
	if !re.MatchString(worker) {
		t.Errorf("pattern %s misses the worker %q", re, worker)
	}
	if re.MatchString(launcherCmd) {
		t.Errorf("pattern %s matches the launcher %q", re, launcherCmd)
	}
	if old := regexp.MustCompile(`train\.py`); !old.MatchString(launcherCmd) {
		t.Error("control: the old advice no longer matches the launcher")
	}
	for cmd, want := range map[string]bool{
		launcherCmd: true, worker: false,
		"/usr/bin/python3 -m torch.distributed.run --nproc_per_node 8 train.py": true,
		"deepspeed --num_gpus 8 train.py":                                       true,
		"/opt/venv/bin/accelerate launch train.py":                              true,
		"/usr/bin/python3 train_torchrun_helper.py":                             false,
	} {
		if got := IsLauncher(cmd); got != want {
			t.Errorf("IsLauncher(%q) = %v, want %v", cmd, got, want)
		}
	}
}
