package checkpoint

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// ManifestVersion is the manifest format written. Version 2 stores a file
// at <run>/<name>/<its path inside the checkpoint's folder>; version 1
// stored it at <run>/<name>/<its path under checkpoint.dir> (so a folder's
// files sat at <name>/<name>/…) and is still read for restore.
const ManifestVersion = 2

// JobManifestVersion is the format of a multi-node job's manifests before
// save attempts (still read for restore): each file names the node that
// holds it and is stored below that node's own prefix,
// <run>/<name>/.preemptd-parts/<node>/<its path inside the folder>, so that
// nodes never write one another's objects.
const JobManifestVersion = 3

// AttemptManifestVersion is the format whose files are stored below their
// save attempt's own folder, so that a name saved again (a fixed folder
// name, the same step after a restart) never overwrites an object that an
// earlier manifest points at: a job's file at
// <run>/<name>/.preemptd-parts/<node>/<attempt>/<path>, a single node's
// re-save at <run>/<name>/.preemptd-attempts/<attempt>/<path>. Every job
// manifest (a node's part, the checkpoint's) is of this version.
const AttemptManifestVersion = 4

// PartsDir is the folder of a job checkpoint's parts inside its prefix;
// CommitsDir holds its committed manifests, one per set of parts
// (<cid>.json, signed by <cid>.sig); AttemptsDir holds a single node's
// re-saves.
const (
	PartsDir    = ".preemptd-parts"
	CommitsDir  = ".preemptd-commits"
	AttemptsDir = ".preemptd-attempts"
)

// ManifestName is the manifest's object name inside a checkpoint's prefix.
const ManifestName = ".preemptd-manifest.json"

// Manifest is written last: a checkpoint without a valid one does not exist
// for restore.
type Manifest struct {
	Version int    `json:"version"`
	Run     string `json:"run"`
	Name    string `json:"name"`
	Layout  string `json:"layout"`
	Step    int64  `json:"step"`
	// Files lists every file with its size and SHA-256; Reused marks a file
	// copied server-side from an earlier checkpoint of the run.
	Files []ManifestFile `json:"files"`
	// Markers are the framework's completion markers among Files.
	Markers  []string `json:"markers,omitempty"`
	Instance string   `json:"instance,omitempty"`
	// Node is set on a job node's part manifest: the node whose part it is.
	Node string `json:"node,omitempty"`
	// Parts lists, on a job's checkpoint manifest, the node parts it was
	// merged from; Commit is that set's id (see commitID).
	Parts  []Part `json:"parts,omitempty"`
	Commit string `json:"commit,omitempty"`
	// Attempt is the save attempt of a part manifest (and of a single
	// node's re-save): its files are stored below it.
	Attempt string `json:"attempt,omitempty"`
	// Pairs, on a job part without the layout's markers (a DCP rank's
	// shards), names the coordinator's save it belongs to.
	Pairs *Pairing `json:"pairs,omitempty"`
	// WrittenAt is the newest file's time when the checkpoint was scanned
	// (its save's end); CommittedAt when its manifest was made.
	WrittenAt   time.Time `json:"written_at"`
	CommittedAt time.Time `json:"committed_at"`
	Bytes       int64     `json:"bytes"`
	// SentBytes is what was uploaded; the rest was reused.
	SentBytes int64 `json:"sent_bytes"`
}

// ManifestFile is one file of a manifest.
type ManifestFile struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	Reused bool   `json:"reused,omitempty"`
	// Node is the job node that holds the file (versions 3 and 4);
	// Attempt the save attempt it was stored by (version 4).
	Node    string `json:"node,omitempty"`
	Attempt string `json:"attempt,omitempty"`
}

// Part is one node's share of a job's checkpoint.
type Part struct {
	Node      string    `json:"node"`
	Instance  string    `json:"instance,omitempty"`
	Attempt   string    `json:"attempt,omitempty"`
	WrittenAt time.Time `json:"written_at,omitzero"`
	Files     int       `json:"files"`
	Bytes     int64     `json:"bytes"`
}

// Pairing names one save of a job's coordinator (the node whose part holds
// the layout's completion markers: DCP's .metadata, written after every
// rank's shards): its node, its newest file's time and its markers'
// SHA-256. A part without markers belongs to exactly the save it pairs
// with; a merge takes it only beside that very coordinator part.
type Pairing struct {
	Node      string            `json:"node"`
	WrittenAt time.Time         `json:"written_at"`
	Markers   map[string]string `json:"markers"`
}

// pairing is the identity of coordinator part m.
func pairing(m Manifest) *Pairing {
	p := &Pairing{Node: m.Node, WrittenAt: m.WrittenAt, Markers: map[string]string{}}
	for _, f := range m.Files {
		if slices.Contains(m.Markers, f.Path) {
			p.Markers[f.Path] = f.SHA256
		}
	}
	return p
}

// Is says whether p names coordinator part m's save.
func (p *Pairing) Is(m Manifest) bool {
	q := pairing(m)
	return p != nil && p.Node == q.Node && p.WrittenAt.Equal(q.WrittenAt) && len(q.Markers) > 0 && maps.Equal(p.Markers, q.Markers)
}

// reserved names cannot be checkpoint names: they are the run's own keys.
var reserved = []string{"latest", "_events", "logs", "_job"}

// safeName checks a checkpoint name: one path element, not reserved.
func safeName(n string) error {
	if n == "" || n == "." || n == ".." || strings.ContainsAny(n, "/\\\x00") {
		return fmt.Errorf("checkpoint name %q is not a single file or folder name", n)
	}
	for _, r := range reserved {
		if n == r {
			return fmt.Errorf("checkpoint name %q is reserved", n)
		}
	}
	return nil
}

// SafeNode checks a job node's name: letters, digits, '.', '_' and '-',
// as instance ids and hostnames are, and not starting with a dot.
func SafeNode(n string) error {
	if !NodeName.MatchString(n) {
		return fmt.Errorf("node name %q must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'", n)
	}
	return nil
}

// NodeName matches the valid job node names.
var NodeName = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`)

// SafePath checks that p is a relative, clean, slash-separated path that
// stays inside its folder.
func SafePath(p string) error {
	if p == "" || strings.ContainsRune(p, 0) || strings.Contains(p, "\\") {
		return fmt.Errorf("path %q is not a plain relative path", p)
	}
	if path.IsAbs(p) || filepath.IsAbs(p) {
		return fmt.Errorf("path %q is absolute", p)
	}
	if c := path.Clean(p); c != p || c == "." || c == ".." || strings.HasPrefix(c, "../") {
		return fmt.Errorf("path %q escapes its folder or is not clean", p)
	}
	return nil
}

// ParseManifest decodes and validates a manifest.
func ParseManifest(b []byte) (Manifest, error) {
	var m Manifest
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&m); err != nil {
		return m, fmt.Errorf("manifest: %w", err)
	}
	return m, m.Validate()
}

// Object is where file f of the checkpoint is stored, below the
// checkpoint's own prefix: its path inside the checkpoint's folder, or, for
// a file outside it (a single-file checkpoint, a framework's pointer file
// beside the folder), its path under checkpoint.dir; a job's file sits
// below its node's part folder, and a file stored by a save attempt below
// that attempt's folder. Every reader and writer of objects asks here.
func (m Manifest) Object(f ManifestFile) string {
	if m.Version < 2 {
		return f.Path
	}
	name := objectName(m.Name, f.Path)
	switch {
	case f.Node != "" && f.Attempt != "":
		return PartsDir + "/" + f.Node + "/" + f.Attempt + "/" + name
	case f.Node != "":
		return PartsDir + "/" + f.Node + "/" + name
	case f.Attempt != "":
		return AttemptsDir + "/" + f.Attempt + "/" + name
	}
	return name
}

// attemptName matches save attempt ids.
var attemptName = regexp.MustCompile(`^[0-9a-f]{8,64}$`)

// newAttempt is a fresh save attempt id.
func newAttempt() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func objectName(name, p string) string {
	if rest, ok := strings.CutPrefix(p, name+"/"); ok {
		return rest
	}
	return p
}

// Validate refuses a manifest restore must not trust.
func (m Manifest) Validate() error {
	if m.Version < 1 || m.Version > AttemptManifestVersion {
		return fmt.Errorf("manifest: version %d, want 1 to %d", m.Version, AttemptManifestVersion)
	}
	if m.Node != "" {
		if err := SafeNode(m.Node); err != nil {
			return fmt.Errorf("manifest: %w", err)
		}
	}
	if m.Attempt != "" && !attemptName.MatchString(m.Attempt) {
		return fmt.Errorf("manifest: attempt %q is not an attempt id", m.Attempt)
	}
	if err := safeName(m.Name); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if len(m.Files) == 0 {
		return errors.New("manifest: no files")
	}
	seen := map[string]bool{}
	var total int64
	jobFiles := 0
	for _, f := range m.Files {
		if err := SafePath(f.Path); err != nil {
			return fmt.Errorf("manifest: %w", err)
		}
		if f.Node != "" {
			jobFiles++
			if err := SafeNode(f.Node); err != nil {
				return fmt.Errorf("manifest: %s: %w", f.Path, err)
			}
		}
		switch {
		case m.Version == AttemptManifestVersion && !attemptName.MatchString(f.Attempt):
			return fmt.Errorf("manifest: %s names no save attempt (version %d stores every file below one)", f.Path, m.Version)
		case m.Version < AttemptManifestVersion && f.Attempt != "":
			return fmt.Errorf("manifest: %s names a save attempt in a version %d manifest", f.Path, m.Version)
		}
		obj := m.Object(f)
		if seen[obj] {
			return fmt.Errorf("manifest: %s listed twice (object %s)", f.Path, obj)
		}
		seen[obj] = true
		if strings.HasPrefix(objectName(m.Name, f.Path), ".preemptd-") {
			return fmt.Errorf("manifest: %s: object names starting .preemptd- are preemptd's own", f.Path)
		}
		if f.Size < 0 {
			return fmt.Errorf("manifest: %s has a negative size", f.Path)
		}
		if b, err := hex.DecodeString(f.SHA256); err != nil || len(b) != sha256.Size {
			return fmt.Errorf("manifest: %s has no valid sha256", f.Path)
		}
		total += f.Size
	}
	switch {
	case m.Version == JobManifestVersion && jobFiles != len(m.Files):
		return fmt.Errorf("manifest: a node is named on every file of a job's manifest (version %d)", JobManifestVersion)
	case m.Version < JobManifestVersion && jobFiles > 0:
		return fmt.Errorf("manifest: a node is named on a file of a version %d manifest", m.Version)
	case m.Version == AttemptManifestVersion && jobFiles != 0 && jobFiles != len(m.Files):
		return errors.New("manifest: a node is named on some files and not on others")
	}
	if total != m.Bytes {
		return fmt.Errorf("manifest: files add up to %d bytes, manifest says %d", total, m.Bytes)
	}
	return nil
}
