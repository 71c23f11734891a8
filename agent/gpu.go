package agent

import (
	"context"
	"time"
)

// GPUSnapshot is the state of the machine's GPUs at one moment, as
// agent/gpu reads it through NVML.
type GPUSnapshot struct {
	// Available is false when there is no NVIDIA driver; Reason says why.
	Available bool        `json:"available"`
	Reason    string      `json:"reason,omitempty"`
	Driver    string      `json:"driver_version,omitempty"`
	CUDA      string      `json:"cuda_version,omitempty"`
	NVML      string      `json:"nvml_version,omitempty"`
	Devices   []GPUDevice `json:"devices"`
	TakenAt   time.Time   `json:"taken_at"`
}

// GPUDevice is one GPU.
type GPUDevice struct {
	Index       int    `json:"index"`
	UUID        string `json:"uuid"`
	Name        string `json:"name"`
	MemoryUsed  uint64 `json:"memory_used_bytes"`
	MemoryTotal uint64 `json:"memory_total_bytes"`
	// UtilGPU and UtilMemory are percentages over NVML's sample period.
	UtilGPU      uint32  `json:"utilization_gpu_percent"`
	UtilMemory   uint32  `json:"utilization_memory_percent"`
	TemperatureC uint32  `json:"temperature_c"`
	PowerW       float64 `json:"power_watts"`
	// ECC counts since the driver loaded (volatile).
	ECCCorrected   uint64 `json:"ecc_corrected_volatile"`
	ECCUncorrected uint64 `json:"ecc_uncorrected_volatile"`
	// Throttle lists the active clock-event (throttle) reasons.
	Throttle  []string     `json:"throttle_reasons,omitempty"`
	Processes []GPUProcess `json:"processes"`
	// Unsupported lists the fields this GPU or driver could not report.
	Unsupported []string `json:"unsupported,omitempty"`
}

// GPUProcess is a compute process holding a GPU.
type GPUProcess struct {
	PID        int    `json:"pid"`
	MemoryUsed uint64 `json:"memory_used_bytes"`
	Name       string `json:"name,omitempty"`
}

// XIDEvent is a critical error reported by the GPU driver.
type XIDEvent struct {
	Device int       `json:"device"`
	UUID   string    `json:"uuid,omitempty"`
	XID    uint64    `json:"xid"`
	At     time.Time `json:"at"`
	// Hardware is false for XIDs that an application causes (13, 31, 43, 45, 68, 109).
	Hardware bool `json:"hardware"`
}

// GPUs is what the agent needs of the GPU reader.
type GPUs interface {
	Snapshot(ctx context.Context) GPUSnapshot
	// WatchXID sends critical XID events until ctx ends.
	WatchXID(ctx context.Context, out chan<- XIDEvent) error
}

// GPUPIDs returns the PIDs of every compute process in the snapshot.
func (s GPUSnapshot) GPUPIDs() []int {
	var pids []int
	for _, d := range s.Devices {
		for _, p := range d.Processes {
			pids = append(pids, p.PID)
		}
	}
	return pids
}
