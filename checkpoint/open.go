package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotScanned is returned when a checkpoint file is not the regular file
// the scan saw: swapped for a symlink (to /etc/shadow, say), a device, or
// another file. preemptd runs as root: it never reads through a link.
var ErrNotScanned = errors.New("not the regular file the scan saw (a symlink, or replaced since)")

// openScanned opens file f of ck for reading without following any symlink
// on the way (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS from the
// checkpoint root; O_NOFOLLOW on kernels without openat2), and checks with
// fstat that it is the regular file the scan saw: same device and inode,
// size and modification time.
func openScanned(ck Checkpoint, f File) (*os.File, error) {
	fd, err := openBeneath(ck.Root, f.Path)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
			return nil, fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrNotScanned)
		}
		return nil, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	file := os.NewFile(uintptr(fd), filepath.Join(ck.Root, filepath.FromSlash(f.Path)))
	st, err := file.Stat()
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	if !st.Mode().IsRegular() || sys == nil || (f.Ino != 0 && (sys.Ino != f.Ino || uint64(sys.Dev) != f.Dev)) {
		file.Close()
		return nil, fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrNotScanned)
	}
	if st.Size() != f.Size || !st.ModTime().Equal(f.ModTime) {
		file.Close()
		return nil, fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrChanged)
	}
	return file, nil
}

// openBeneath opens rel below root, read-only, refusing symlinks anywhere
// in the path and any escape from root.
func openBeneath(root, rel string) (int, error) {
	dir, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(dir)
	fd, err := unix.Openat2(dir, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		// No openat2 (Linux < 5.6, or a seccomp filter): the last component
		// at least is never followed; the scan saw no symlinked folder.
		fd, err = unix.Openat(dir, rel, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: filepath.Join(root, rel), Err: err}
	}
	return fd, nil
}
