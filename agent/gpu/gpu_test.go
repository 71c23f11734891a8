package gpu

import (
	"context"
	"errors"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/trainer"
)

// machine is a mocked DGX H100 with the calls the mock server leaves out
// filled in: utilisation, temperature, power, ECC, throttle reasons and the
// compute processes, which the test can change.
type machine struct {
	*server.Server
	mu    sync.Mutex
	procs map[int][]nvml.ProcessInfo // by device index
}

func newMachine(t *testing.T) *machine {
	t.Helper()
	m := &machine{Server: dgxh100.New(), procs: map[int][]nvml.ProcessInfo{}}
	m.SystemGetCudaDriverVersionFunc = func() (int, nvml.Return) { return 12040, nvml.SUCCESS }
	for i, d := range m.Devices {
		dev := d.(*server.Device)
		dev.MemoryInfo.Used = uint64(i) << 30
		dev.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: uint32(10 * i), Memory: 5}, nvml.SUCCESS
		}
		dev.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 40 + uint32(i), nvml.SUCCESS }
		dev.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 350500, nvml.SUCCESS }
		dev.GetTotalEccErrorsFunc = func(kind nvml.MemoryErrorType, _ nvml.EccCounterType) (uint64, nvml.Return) {
			if i == 5 && kind == nvml.MEMORY_ERROR_TYPE_UNCORRECTED {
				return 2, nvml.SUCCESS
			}
			return 0, nvml.SUCCESS
		}
		dev.GetCurrentClocksEventReasonsFunc = func() (uint64, nvml.Return) {
			if i == 2 {
				return nvml.ClocksEventReasonSwPowerCap | nvml.ClocksThrottleReasonHwThermalSlowdown, nvml.SUCCESS
			}
			return 0, nvml.SUCCESS
		}
		dev.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
			m.mu.Lock()
			defer m.mu.Unlock()
			return slices.Clone(m.procs[i]), nvml.SUCCESS
		}
	}
	return m
}

func (m *machine) setProcs(dev int, pids ...int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ps []nvml.ProcessInfo
	for _, p := range pids {
		ps = append(ps, nvml.ProcessInfo{Pid: uint32(p), UsedGpuMemory: 1 << 30})
	}
	m.procs[dev] = ps
}

func TestSnapshotDGXH100(t *testing.T) {
	m := newMachine(t)
	m.setProcs(0, 4242)
	m.setProcs(3, 4343, 4444)
	r := OpenWith(m, nil)
	s := r.Snapshot(t.Context())
	if !s.Available || s.Driver != "550.54.15" || s.CUDA != "12.4" || len(s.Devices) != 8 {
		t.Fatalf("snapshot = %+v", s)
	}
	d0, d2, d3, d5 := s.Devices[0], s.Devices[2], s.Devices[3], s.Devices[5]
	if d0.Name != "NVIDIA H100 80GB HBM3" || d0.UUID == "" || d0.MemoryTotal != 80<<30 || d3.MemoryUsed != 3<<30 {
		t.Fatalf("device 0 = %+v, device 3 memory %d", d0, d3.MemoryUsed)
	}
	if d2.UtilGPU != 20 || d2.TemperatureC != 42 || d2.PowerW != 350.5 {
		t.Fatalf("device 2 = %+v", d2)
	}
	if !slices.Equal(d2.Throttle, []string{"sw_power_cap", "hw_thermal_slowdown"}) {
		t.Fatalf("throttle = %v", d2.Throttle)
	}
	if d5.ECCUncorrected != 2 || d0.ECCUncorrected != 0 {
		t.Fatalf("ecc: device 5 %d, device 0 %d", d5.ECCUncorrected, d0.ECCUncorrected)
	}
	if len(d0.Processes) != 1 || d0.Processes[0].PID != 4242 || len(d3.Processes) != 2 || len(s.Devices[1].Processes) != 0 {
		t.Fatalf("processes: %+v / %+v", d0.Processes, d3.Processes)
	}
	if got := s.GPUPIDs(); !slices.Equal(got, []int{4242, 4343, 4444}) {
		t.Fatalf("GPUPIDs = %v", got)
	}
	for _, d := range s.Devices {
		if len(d.Unsupported) != 0 {
			t.Fatalf("device %d unsupported %v", d.Index, d.Unsupported)
		}
	}
}

func TestSnapshotUnsupportedField(t *testing.T) {
	m := newMachine(t)
	dev := m.Devices[1].(*server.Device)
	dev.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }
	s := OpenWith(m, nil).Snapshot(t.Context())
	if d := s.Devices[1]; len(d.Unsupported) != 1 || d.PowerW != 0 || d.TemperatureC != 41 {
		t.Fatalf("device 1 = %+v", d)
	}
}

// TestLibraryLoadFailure: no driver is a Null reader with a reason, never a
// failure.
func TestLibraryLoadFailure(t *testing.T) {
	lib := &mock.Interface{InitFunc: func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }}
	r := OpenWith(lib, nil)
	if _, ok := r.(Null); !ok {
		t.Fatalf("reader = %T, want Null", r)
	}
	s := r.Snapshot(t.Context())
	if s.Available || s.Reason != "no NVIDIA driver: libnvidia-ml.so.1 not found" || s.Devices == nil {
		t.Fatalf("snapshot = %+v", s)
	}
	if _, err := r.PIDs(t.Context()); err == nil {
		t.Fatal("PIDs without a driver returned no error")
	}
	if err := r.WaitRelease(t.Context(), []int{1}); err != nil {
		t.Fatal(err)
	}
	panicky := &mock.Interface{InitFunc: func() nvml.Return { panic("broken library") }}
	if _, ok := OpenWith(panicky, nil).(Null); !ok {
		t.Fatal("a panicking Init did not give Null")
	}
}

// TestRealLibraryAbsent: on this machine (no NVIDIA driver) the real NVML
// binding reports Null.
func TestRealLibraryAbsent(t *testing.T) {
	r := Open(nil)
	defer r.Close()
	s := r.Snapshot(t.Context())
	if _, null := r.(Null); !null {
		t.Skipf("a real NVIDIA driver is present (%d GPUs): nothing to check here", len(s.Devices))
	}
	if s.Available || s.Reason == "" {
		t.Fatalf("snapshot = %+v", s)
	}
}

// TestXIDEvents: a critical XID on device 2 comes out of WatchXID between
// timeouts, classified; the loop stops when ctx ends.
func TestXIDEvents(t *testing.T) {
	m := newMachine(t)
	var registered int
	for _, d := range m.Devices {
		d.(*server.Device).RegisterEventsFunc = func(types uint64, _ nvml.EventSet) nvml.Return {
			if types != nvml.EventTypeXidCriticalError {
				return nvml.ERROR_INVALID_ARGUMENT
			}
			registered++
			return nvml.SUCCESS
		}
	}
	var calls int
	events := []nvml.EventData{
		{Device: m.Devices[2], EventType: nvml.EventTypeXidCriticalError, EventData: 79},
		{Device: m.Devices[4], EventType: nvml.EventTypeXidCriticalError, EventData: 13},
	}
	freed := false
	set := &mock.EventSet{
		WaitFunc: func(timeout uint32) (nvml.EventData, nvml.Return) {
			calls++
			if timeout == 0 || timeout > 1000 {
				t.Errorf("Wait(%d): want a bounded timeout", timeout)
			}
			if calls%3 == 0 && len(events) > 0 {
				e := events[0]
				events = events[1:]
				return e, nvml.SUCCESS
			}
			time.Sleep(time.Millisecond)
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		},
		FreeFunc: func() nvml.Return { freed = true; return nvml.SUCCESS },
	}
	m.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return set, nvml.SUCCESS }
	r := OpenWith(m, nil)
	out := make(chan agent.XIDEvent, 4)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.WatchXID(ctx, out) }()
	a, b := <-out, <-out
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchXID = %v", err)
	}
	if registered != 8 || !freed {
		t.Fatalf("registered %d devices, freed %v", registered, freed)
	}
	if a.XID != 79 || a.Device != 2 || !a.Hardware || a.UUID == "" {
		t.Fatalf("first event = %+v", a)
	}
	if b.XID != 13 || b.Device != 4 || b.Hardware {
		t.Fatalf("second event = %+v (XID 13 is an application fault)", b)
	}
}

// TestGPUProcessesAreSignalled: the process NVML reports on a GPU is the one
// that receives the trainer's signal.
func TestGPUProcessesAreSignalled(t *testing.T) {
	victim := exec.Command("sleep", "60")
	bystander := exec.Command("sleep", "60")
	for _, c := range []*exec.Cmd{victim, bystander} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	}
	m := newMachine(t)
	m.setProcs(6, victim.Process.Pid)
	r := OpenWith(m, nil)
	tr, err := trainer.New(trainer.Config{}, r, nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := tr.Signal(t.Context(), "SIGTERM")
	if err != nil || !slices.Equal(rep.PIDs, []int{victim.Process.Pid}) || !slices.Equal(rep.Sources, []string{"gpu_processes"}) {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	err = victim.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Fatalf("GPU process ended with %v, want SIGTERM", err)
	}
	if bystander.ProcessState != nil {
		t.Fatal("a process not on the GPU was signalled")
	}
}

func TestWaitRelease(t *testing.T) {
	m := newMachine(t)
	m.setProcs(1, 100, 101)
	m.setProcs(7, 300)
	r := OpenWith(m, nil)
	go func() {
		time.Sleep(150 * time.Millisecond)
		m.setProcs(1)
	}()
	if err := r.WaitRelease(t.Context(), []int{100, 101}); err != nil {
		t.Fatalf("WaitRelease after release: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if err := r.WaitRelease(ctx, []int{300}); err == nil {
		t.Fatal("WaitRelease returned while PID 300 still holds GPU 7")
	}
}

func TestThrottleReasons(t *testing.T) {
	if got := ThrottleReasons(0); len(got) != 0 {
		t.Fatalf("none: %v", got)
	}
	if got := ThrottleReasons(nvml.ClocksEventReasonGpuIdle); !slices.Equal(got, []string{"gpu_idle"}) {
		t.Fatalf("idle: %v", got)
	}
}
