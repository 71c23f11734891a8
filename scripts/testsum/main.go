// Command testsum reads `go test -json` on stdin and prints what a person
// wants from `make test`: each package's result line as go test prints it,
// the output of every failed test, every skipped test with its reason, and
// a closing "N passed, N failed, N skipped" line. It exits 1 when anything
// failed (or the build did).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

func main() {
	output := map[string][]string{} // package/test → its output lines
	var skips []string
	passed, failed, skipped := 0, 0, 0
	bad := false
	failedTests := map[string]int{} // package → its failed tests
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			fmt.Println(string(line)) // build errors and the like come as plain text
			if strings.Contains(string(line), "FAIL") || strings.Contains(string(line), "cannot") {
				bad = true
			}
			continue
		}
		key := e.Package + "/" + e.Test
		switch e.Action {
		case "build-output":
			fmt.Print(e.Output)
		case "build-fail":
			bad = true
		case "output":
			if e.Test == "" {
				if t := strings.TrimSpace(e.Output); strings.HasPrefix(t, "ok") || strings.HasPrefix(t, "FAIL") ||
					strings.HasPrefix(t, "?") || strings.HasPrefix(t, "panic") || strings.Contains(t, "[build failed]") {
					fmt.Print(e.Output)
				}
				continue
			}
			output[key] = append(output[key], e.Output)
		case "pass":
			if e.Test != "" {
				passed++
				delete(output, key)
			}
		case "fail":
			if e.Test != "" {
				failed++
				failedTests[e.Package]++
				fmt.Printf("--- FAIL: %s %s (%.2fs)\n", e.Package, e.Test, e.Elapsed)
				for _, o := range output[key] {
					fmt.Print("    " + o)
				}
			} else {
				bad = true
				if failedTests[e.Package] == 0 {
					failed++ // a package that failed without a failing test: its build, a panic, a timeout
					// The tests still running then (a timeout's panic is in their output).
					for k, lines := range output {
						if !strings.HasPrefix(k, e.Package+"/") || k == e.Package+"/" {
							continue
						}
						fmt.Printf("--- DID NOT FINISH: %s %s\n", e.Package, strings.TrimPrefix(k, e.Package+"/"))
						for _, o := range lines[max(0, len(lines)-40):] {
							fmt.Print("    " + o)
						}
					}
				}
			}
			delete(output, key)
		case "skip":
			if e.Test != "" {
				skipped++
				skips = append(skips, fmt.Sprintf("%s %s: %s", e.Package, e.Test, reason(output[key])))
			}
			delete(output, key)
		}
	}
	if len(skips) > 0 {
		sort.Strings(skips)
		fmt.Println("\nskipped, and why:")
		for _, s := range skips {
			fmt.Println("  " + s)
		}
	}
	fmt.Printf("\n%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 || bad {
		os.Exit(1)
	}
}

// reason is the skip message among a skipped test's output lines.
func reason(lines []string) string {
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "---") || strings.HasPrefix(t, "===") || t == "" {
			continue
		}
		if i := strings.Index(t, ": "); i > 0 && strings.Contains(t[:i], ".go:") {
			return t[i+2:]
		}
		return t
	}
	return "(no reason given)"
}
