// Package memory keeps preemptd's resident set to what it uses while idle.
// Every package's start-up code runs once and is spread over the whole
// executable, so after start nearly all of the binary's pages are resident
// (the kernel maps pages around each fault). DropStartup asks the kernel to
// reclaim them once (MADV_PAGEOUT on the executable's clean, file-backed
// mappings): the pages the watch loop uses fault back in from the page
// cache, the rest stay out. Nothing is lost — they are clean file pages.
package memory

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DropStartup pages out the executable's read-only mappings and says how
// many bytes it asked about.
func DropStartup() (int, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	defer f.Close()
	total := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 00400000-00411000 r--p 00000000 fe:00 9978193   /path/to/exe
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != exe || strings.Contains(fields[1], "w") {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_PAGEOUT); errno != 0 {
			return total, fmt.Errorf("memory: madvise: %w", errno)
		}
		// Only the pages touched from now on come back, not their neighbours.
		unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_RANDOM)
		total += int(end - start)
	}
	return total, sc.Err()
}
