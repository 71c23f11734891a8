// Package gpu reads the machine's NVIDIA GPUs through NVML (go-nvml): a
// snapshot of every device and the compute processes on it, critical XID
// events waited on with a timeout, and the PIDs holding the GPUs (signal
// targets for trainer.gpu_processes). Without a driver it is a Null reader
// that says why in one log line. go-nvml needs cgo and a dynamically linked
// binary: a fully static build crashes inside nvmlInit.
package gpu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/preemptd/preemptd/agent"
)

// Reader is a GPU reader: NVML or Null.
type Reader interface {
	agent.GPUs
	// PIDs returns the processes on the GPUs (trainer.Extra).
	PIDs(ctx context.Context) ([]int, error)
	// WaitRelease waits until none of pids holds a GPU.
	WaitRelease(ctx context.Context, pids []int) error
	Close() error
}

// Open initialises NVML and returns a reader; when the library is absent or
// will not start, it returns Null with the reason (never an error).
func Open(log *slog.Logger) Reader {
	return OpenWith(nvml.New(), log)
}

// OpenWith is Open on a given NVML interface (a mock in tests).
func OpenWith(lib nvml.Interface, log *slog.Logger) Reader {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("part", "gpu")
	if ret := safeInit(lib); ret != nvml.SUCCESS {
		reason := fmt.Sprintf("NVML unavailable: %s", errorString(ret))
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
			reason = "no NVIDIA driver: libnvidia-ml.so.1 not found"
		}
		log.Info("no GPU information", "reason", reason)
		return Null{Reason: reason}
	}
	n := &NVML{lib: lib, log: log, procRoot: "/proc"}
	if v, ret := lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		n.driver = v
	}
	if v, ret := lib.SystemGetNVMLVersion(); ret == nvml.SUCCESS {
		n.nvmlVer = v
	}
	if v, ret := lib.SystemGetCudaDriverVersion(); ret == nvml.SUCCESS {
		n.cuda = fmt.Sprintf("%d.%d", v/1000, (v%1000)/10)
	}
	log.Info("NVML ready", "driver", n.driver, "cuda", n.cuda)
	return n
}

// safeInit calls Init, turning a panic in a broken library into an error.
func safeInit(lib nvml.Interface) (ret nvml.Return) {
	defer func() {
		if recover() != nil {
			ret = nvml.ERROR_UNINITIALIZED
		}
	}()
	return lib.Init()
}

func errorString(r nvml.Return) string {
	defer func() { recover() }() // ErrorString needs the library loaded
	return r.Error()
}

// Null is the reader on a machine without an NVIDIA driver.
type Null struct{ Reason string }

// Snapshot implements agent.GPUs.
func (z Null) Snapshot(context.Context) agent.GPUSnapshot {
	return agent.GPUSnapshot{Available: false, Reason: z.Reason, Devices: []agent.GPUDevice{}, TakenAt: time.Now()}
}

// WatchXID waits for ctx: there are no events without a driver.
func (Null) WatchXID(ctx context.Context, _ chan<- agent.XIDEvent) error {
	<-ctx.Done()
	return ctx.Err()
}

// PIDs finds none.
func (z Null) PIDs(context.Context) ([]int, error) { return nil, errors.New(z.Reason) }

// WaitRelease has nothing to wait for.
func (Null) WaitRelease(context.Context, []int) error { return nil }

// Close does nothing.
func (Null) Close() error { return nil }

// NVML reads GPUs through an nvml.Interface.
type NVML struct {
	lib      nvml.Interface
	log      *slog.Logger
	driver   string
	nvmlVer  string
	cuda     string
	procRoot string
}

// Close shuts NVML down.
func (n *NVML) Close() error {
	if ret := n.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("nvml shutdown: %s", errorString(ret))
	}
	return nil
}

// Snapshot implements agent.GPUs. A field a device cannot report is listed
// in its Unsupported, never a failure of the whole snapshot.
func (n *NVML) Snapshot(ctx context.Context) agent.GPUSnapshot {
	s := agent.GPUSnapshot{Available: true, Driver: n.driver, CUDA: n.cuda, NVML: n.nvmlVer,
		Devices: []agent.GPUDevice{}, TakenAt: time.Now()}
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		s.Available, s.Reason = false, "device count: "+errorString(ret)
		return s
	}
	for i := range count {
		if ctx.Err() != nil {
			break
		}
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			s.Devices = append(s.Devices, agent.GPUDevice{Index: i, Unsupported: []string{"handle: " + errorString(ret)}})
			continue
		}
		s.Devices = append(s.Devices, n.device(i, dev))
	}
	return s
}

func (n *NVML) device(i int, dev nvml.Device) agent.GPUDevice {
	d := agent.GPUDevice{Index: i, Processes: []agent.GPUProcess{}}
	miss := func(field string, ret nvml.Return) {
		d.Unsupported = append(d.Unsupported, field+": "+errorString(ret))
	}
	var ret nvml.Return
	if d.UUID, ret = dev.GetUUID(); ret != nvml.SUCCESS {
		miss("uuid", ret)
	}
	if d.Name, ret = dev.GetName(); ret != nvml.SUCCESS {
		miss("name", ret)
	}
	if m, ret := dev.GetMemoryInfo(); ret == nvml.SUCCESS {
		d.MemoryUsed, d.MemoryTotal = m.Used, m.Total
	} else {
		miss("memory", ret)
	}
	if u, ret := dev.GetUtilizationRates(); ret == nvml.SUCCESS {
		d.UtilGPU, d.UtilMemory = u.Gpu, u.Memory
	} else {
		miss("utilization", ret)
	}
	if t, ret := dev.GetTemperature(nvml.TEMPERATURE_GPU); ret == nvml.SUCCESS {
		d.TemperatureC = t
	} else {
		miss("temperature", ret)
	}
	if p, ret := dev.GetPowerUsage(); ret == nvml.SUCCESS {
		d.PowerW = float64(p) / 1000
	} else {
		miss("power", ret)
	}
	if c, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC); ret == nvml.SUCCESS {
		d.ECCCorrected = c
	} else {
		miss("ecc", ret)
	}
	if c, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); ret == nvml.SUCCESS {
		d.ECCUncorrected = c
	}
	if r, ret := dev.GetCurrentClocksEventReasons(); ret == nvml.SUCCESS {
		d.Throttle = ThrottleReasons(r)
	} else {
		miss("throttle", ret)
	}
	if ps, ret := dev.GetComputeRunningProcesses(); ret == nvml.SUCCESS {
		for _, p := range ps {
			d.Processes = append(d.Processes, agent.GPUProcess{PID: int(p.Pid), MemoryUsed: p.UsedGpuMemory,
				Name: n.procName(int(p.Pid))})
		}
	} else {
		miss("processes", ret)
	}
	return d
}

func (n *NVML) procName(pid int) string {
	b, err := os.ReadFile(n.procRoot + "/" + strconv.Itoa(pid) + "/comm")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

var throttleNames = []struct {
	bit  uint64
	name string
}{
	{nvml.ClocksEventReasonGpuIdle, "gpu_idle"},
	{nvml.ClocksEventReasonApplicationsClocksSetting, "applications_clocks_setting"},
	{nvml.ClocksEventReasonSwPowerCap, "sw_power_cap"},
	{nvml.ClocksThrottleReasonHwSlowdown, "hw_slowdown"},
	{nvml.ClocksEventReasonSyncBoost, "sync_boost"},
	{nvml.ClocksEventReasonSwThermalSlowdown, "sw_thermal_slowdown"},
	{nvml.ClocksThrottleReasonHwThermalSlowdown, "hw_thermal_slowdown"},
	{nvml.ClocksThrottleReasonHwPowerBrakeSlowdown, "hw_power_brake_slowdown"},
	{nvml.ClocksEventReasonDisplayClockSetting, "display_clock_setting"},
}

// ThrottleReasons names the bits of an NVML clocks-event reason mask.
func ThrottleReasons(mask uint64) []string {
	var out []string
	for _, t := range throttleNames {
		if mask&t.bit != 0 {
			out = append(out, t.name)
		}
	}
	return out
}

// PIDs implements trainer.Extra: every compute process on every GPU.
func (n *NVML) PIDs(ctx context.Context) ([]int, error) {
	s := n.Snapshot(ctx)
	if !s.Available {
		return nil, errors.New(s.Reason)
	}
	pids := s.GPUPIDs()
	if len(pids) == 0 {
		return nil, errors.New("no compute process on any GPU")
	}
	return pids, nil
}

// WaitRelease polls until none of pids appears on a GPU, or ctx ends.
func (n *NVML) WaitRelease(ctx context.Context, pids []int) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("GPUs still held by the trainer: %w", err)
		}
		held := false
		// A snapshot cut short by ctx would look like a release.
		for _, p := range n.Snapshot(context.WithoutCancel(ctx)).GPUPIDs() {
			if slices.Contains(pids, p) {
				held = true
				break
			}
		}
		if !held {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("GPUs still held by the trainer: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// applicationXIDs are the XIDs an application's fault causes (per NVIDIA's
// XID catalogue), as opposed to the hardware or driver.
var applicationXIDs = []uint64{13, 31, 43, 45, 68, 109}

// waitTimeout bounds each EventSet.Wait so that the loop sees ctx.
const waitTimeout = 500 // ms

// WatchXID implements agent.GPUs: critical XID events from every device.
func (n *NVML) WatchXID(ctx context.Context, out chan<- agent.XIDEvent) error {
	set, ret := n.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("nvml event set: %s", errorString(ret))
	}
	defer set.Free()
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("nvml device count: %s", errorString(ret))
	}
	registered := 0
	for i := range count {
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			continue
		}
		if ret := dev.RegisterEvents(nvml.EventTypeXidCriticalError, set); ret != nvml.SUCCESS {
			n.log.Info("XID events not supported on this GPU", "index", i, "reason", errorString(ret))
			continue
		}
		registered++
	}
	if registered == 0 {
		<-ctx.Done()
		return ctx.Err()
	}
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		ev, ret := set.Wait(waitTimeout)
		switch ret {
		case nvml.SUCCESS:
		case nvml.ERROR_TIMEOUT:
			continue
		default:
			n.log.Warn("waiting for GPU events", "err", errorString(ret))
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
			continue
		}
		if ev.EventType != nvml.EventTypeXidCriticalError {
			continue
		}
		x := agent.XIDEvent{XID: ev.EventData, At: time.Now(), Hardware: !slices.Contains(applicationXIDs, ev.EventData), Device: -1}
		if ev.Device != nil {
			if idx, ret := ev.Device.GetIndex(); ret == nvml.SUCCESS {
				x.Device = idx
			}
			if uuid, ret := ev.Device.GetUUID(); ret == nvml.SUCCESS {
				x.UUID = uuid
			}
		}
		select {
		case out <- x:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ReleaseStep is the emergency step of trainer.wait_gpu_release: it waits,
// within the deadline, until every process that held a GPU when it started
// (just after the trainer was signalled) has let go.
type ReleaseStep struct{ R Reader }

// Name implements agent.Step.
func (ReleaseStep) Name() string { return "gpu-release" }

// Run implements agent.Step.
func (s ReleaseStep) Run(ctx context.Context, _ agent.Notice) error {
	holders := s.R.Snapshot(ctx).GPUPIDs()
	if len(holders) == 0 {
		return nil
	}
	return s.R.WaitRelease(ctx, holders)
}
