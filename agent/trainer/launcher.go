package trainer

import "regexp"

// launcher matches the command line of a launcher that forwards signals to
// its workers and kills them later (torchrun, torch.distributed.run and
// .launch, deepspeed, accelerate launch): signalling it instead of the
// workers wastes its grace period.
var launcher = regexp.MustCompile(`(^|[ /])(torchrun|deepspeed|accelerate launch)( |$)|torch\.distributed\.(run|launch)( |$)`)

// IsLauncher reports whether cmdline (NULs as spaces) is such a launcher.
func IsLauncher(cmdline string) bool { return launcher.MatchString(cmdline) }

// WorkersPattern is a trainer.match that finds torchrun's workers and not
// torchrun itself for a script named script: torchrun starts each worker
// as `<python> -u <script> …`, while its own command line is
// `<python> <path>/torchrun … <script> …`.
func WorkersPattern(script string) string {
	return `^\S*python[0-9.]* -u \S*` + regexp.QuoteMeta(script) + `( |$)`
}
