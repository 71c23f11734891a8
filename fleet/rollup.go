package fleet

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	gojson "github.com/goccy/go-json"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// RollupPrefix holds one newline-delimited JSON file per compacted day:
// _events/rollups/day=<YYYY-MM-DD>/records.ndjson, every record of that day
// with the key of the per-notice object it came from. The per-notice
// records it holds are deleted once it is written (CompactDay); a record
// listed that its day's rollup lacks, or written after it, is read on its
// own, so one that arrives late is never lost.
const RollupPrefix = EventsPrefix + "/rollups"

// RollupName is the file name of a day's rollup.
const RollupName = "records.ndjson"

// rollupSlack allows for stores whose listed times have a second's
// granularity: a record written up to this long before its day's rollup is
// read again on its own.
const rollupSlack = 2 * time.Second

// getters is how many records are read at once.
const getters = 32

// RollupKey is the object key of day's rollup.
func RollupKey(day string) string { return RollupPrefix + "/day=" + day + "/" + RollupName }

// dayOf returns the day of a per-notice record's key (either layout) or of
// a rollup's key, and whether the key is a rollup.
func dayOf(key string) (day string, rollup bool, ok bool) {
	rest, found := strings.CutPrefix(key, EventsPrefix+"/")
	if !found {
		return "", false, false
	}
	if r, isRollup := strings.CutPrefix(rest, "rollups/"); isRollup {
		d, file, _ := strings.Cut(r, "/")
		d, _ = strings.CutPrefix(d, "day=")
		return d, true, file == RollupName && validDay(d)
	}
	d, file, _ := strings.Cut(rest, "/")
	d, _ = strings.CutPrefix(d, "day=")
	return d, false, strings.HasSuffix(file, ".json") && !strings.Contains(file, "/") && validDay(d)
}

func validDay(d string) bool {
	_, err := time.Parse(time.DateOnly, d)
	return err == nil
}

// Loaded is what Read found.
type Loaded struct {
	Records []Record
	// Bad counts unreadable records; Rollups the days read from a rollup.
	Bad, Rollups int
	// Singly are, per day, the records read on their own: not in the day's
	// rollup, or written after it (today's, and late ones).
	Singly map[string][]Record
}

// Read reads every record noticed on or after since's day (zero: all):
// one GET per compacted day, one per record not in a rollup; records are
// read in parallel, in order of their keys. A record read on its own
// replaces its day's rollup's line of the same key (it was written after).
func Read(ctx context.Context, st storage.Store, since time.Time) (Loaded, error) {
	objs, err := st.List(ctx, EventsPrefix)
	if err != nil {
		return Loaded{}, err
	}
	from := ""
	if !since.IsZero() {
		from = since.UTC().Format(time.DateOnly)
	}
	rollups := map[string]storage.Object{}
	var singles []storage.Object
	for _, o := range objs {
		day, isRollup, ok := dayOf(o.Key)
		if !ok || day < from {
			continue
		}
		if isRollup {
			rollups[day] = o
		} else {
			singles = append(singles, o)
		}
	}
	out := Loaded{Singly: map[string][]Record{}, Rollups: len(rollups)}
	perDay := map[string][]Record{} // each day's records, the rollup's first
	var mu sync.Mutex
	err = parallel(ctx, slices.Collect(maps.Values(rollups)), func(o storage.Object) error {
		recs, bad, err := getRollup(ctx, st, o.Key)
		if err != nil {
			return fmt.Errorf("rollup %s: %w", o.Key, err)
		}
		day, _, _ := dayOf(o.Key)
		mu.Lock()
		defer mu.Unlock()
		out.Bad += bad
		perDay[day] = recs
		return nil
	})
	if err != nil {
		return out, err
	}
	// A record listed that its day's rollup holds, and older than the
	// rollup, is not read again: the day's keys are looked up only for the
	// days with such records (today's, late ones).
	inRollup := map[string]map[string]int{} // day → key → index in perDay[day]
	keysOf := func(day string) map[string]int {
		m, ok := inRollup[day]
		if !ok {
			m = make(map[string]int, len(perDay[day]))
			for i, r := range perDay[day] {
				m[r.Key] = i
			}
			inRollup[day] = m
		}
		return m
	}
	var read []storage.Object
	for _, o := range singles {
		day, _, _ := dayOf(o.Key)
		ro, compacted := rollups[day]
		if _, in := keysOf(day)[o.Key]; compacted && in && o.ModTime.Before(ro.ModTime.Add(-rollupSlack)) {
			continue
		}
		read = append(read, o)
	}
	recs, bad, err := readRecords(ctx, st, read)
	if err != nil {
		return out, err
	}
	out.Bad += bad
	for _, r := range recs {
		day, _, _ := dayOf(r.Key)
		if i, ok := keysOf(day)[r.Key]; ok {
			perDay[day][i] = r
		} else {
			perDay[day] = append(perDay[day], r)
			inRollup[day][r.Key] = len(perDay[day]) - 1
		}
		out.Singly[day] = append(out.Singly[day], r)
	}
	n := 0
	for _, recs := range perDay {
		n += len(recs)
	}
	out.Records = make([]Record, 0, n)
	for _, day := range slices.Sorted(maps.Keys(perDay)) {
		recs := perDay[day]
		slices.SortFunc(recs, func(a, b Record) int { return strings.Compare(a.Key, b.Key) }) // a rollup's are in order already
		out.Records = append(out.Records, recs...)
	}
	return out, nil
}

// getRollup reads and parses the rollup at key; bad counts its unreadable
// lines.
func getRollup(ctx context.Context, st storage.Store, key string) (recs []Record, bad int, err error) {
	var buf jsonBuf
	buf.limit = 1 << 30
	if err := st.Get(ctx, key, &buf); err != nil {
		return nil, 0, err
	}
	recs, bad = parseRollup(buf.b)
	return recs, bad, nil
}

// readRecords reads the per-notice records objs, getters at a time, each
// with its Key; bad counts those unreadable (left where they are).
func readRecords(ctx context.Context, st storage.Store, objs []storage.Object) (recs []Record, bad int, err error) {
	var mu sync.Mutex
	err = parallel(ctx, objs, func(o storage.Object) error {
		var buf jsonBuf
		err := st.Get(ctx, o.Key, &buf)
		var r Record
		if err == nil {
			err = json.Unmarshal(buf.b, &r)
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil || !known(r) {
			bad++
			return nil
		}
		r.Key = o.Key
		recs = append(recs, r)
		return nil
	})
	return recs, bad, err
}

// Load reads every record in the store, skipping (and counting) bad ones.
func Load(ctx context.Context, st storage.Store) ([]Record, int, error) {
	l, err := Read(ctx, st, time.Time{})
	return l.Records, l.Bad, err
}

func parseRollup(b []byte) ([]Record, int) {
	var out []Record
	bad := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var r Record
		if err := gojson.Unmarshal(line, &r); err != nil || r.Key == "" || !known(r) {
			bad++
			continue
		}
		out = append(out, r)
	}
	return out, bad
}

// known reports whether r is of a record version this release reads.
func known(r Record) bool { return r.Version >= 1 && r.Version <= RecordVersion }

// parallel runs f over items, getters at a time; the first error wins.
func parallel(ctx context.Context, items []storage.Object, f func(storage.Object) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan storage.Object)
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for range min(getters, len(items)) {
		wg.Go(func() {
			for o := range work {
				if err := f(o); err != nil {
					once.Do(func() { first = err; cancel() })
				}
			}
		})
	}
	for _, o := range items {
		select {
		case work <- o:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// Compact writes the rollup of every day before `before` (UTC) that has
// records read on their own (see CompactDay). Running it again with
// nothing new writes nothing; a record that arrives after it is read on
// its own until the next. It returns the days written and the records
// they hold.
func Compact(ctx context.Context, st storage.Store, l Loaded, before time.Time) (days, records int, err error) {
	cut := before.UTC().Format(time.DateOnly)
	for _, day := range slices.Sorted(maps.Keys(l.Singly)) {
		if day >= cut {
			continue
		}
		n, _, err := CompactDay(ctx, st, day, l.Singly[day])
		if err != nil {
			return days, records, err
		}
		if n > 0 {
			days++
			records += n
		}
	}
	return days, records, nil
}

// CompactDay merges singles, records of day read on their own (each with
// its Key), into the day's rollup, and then deletes their objects: the
// rollup replaces them, so the day's listing shrinks to the rollup. The
// rollup is read and replaced as one version (a conditional create or
// replace), so of daemons compacting the day at once one writes and the
// others give way (ErrConflict: nothing written, nothing deleted); a
// record that arrived after singles were listed is not among them and
// stays, read on its own until the next compaction. Where the store takes
// no conditional replace the rollup is rewritten and nothing is deleted.
// It returns the records the rollup holds (0 when it gave way) and the
// objects deleted.
func CompactDay(ctx context.Context, st storage.Store, day string, singles []Record) (records, deleted int, err error) {
	if len(singles) == 0 {
		return 0, 0, nil
	}
	sw, ok := st.(storage.Swapper)
	if !ok {
		return 0, 0, fmt.Errorf("rollup %s: %s takes no conditional write", day, st)
	}
	var buf jsonBuf
	buf.limit = 1 << 30
	version, err := sw.GetVersion(ctx, RollupKey(day), &buf)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		version, buf.b = "", nil
	case err != nil:
		return 0, 0, fmt.Errorf("rollup %s: %w", day, err)
	}
	have, _ := parseRollup(buf.b)
	byKey := map[string]Record{}
	for _, r := range have {
		byKey[r.Key] = r
	}
	for _, r := range singles {
		if old, ok := byKey[r.Key]; !ok || !r.UpdatedAt.Before(old.UpdatedAt) {
			byKey[r.Key] = r
		}
	}
	var b bytes.Buffer
	for _, k := range slices.Sorted(maps.Keys(byKey)) {
		line, _ := json.Marshal(byKey[k])
		b.Write(line)
		b.WriteByte('\n')
	}
	err = sw.PutIf(ctx, RollupKey(day), b.Bytes(), version)
	switch {
	case errors.Is(err, storage.ErrConflict):
		return 0, 0, nil // another daemon compacted the day meanwhile
	case errors.Is(err, storage.ErrNoSwap):
		if version == "" {
			err = st.Create(ctx, RollupKey(day), b.Bytes())
			if errors.Is(err, storage.ErrExists) {
				return 0, 0, nil
			}
		} else {
			err = st.PutBytes(ctx, RollupKey(day), b.Bytes())
		}
		if err != nil {
			return 0, 0, fmt.Errorf("rollup %s: %w", day, err)
		}
		if version != "" {
			return len(byKey), 0, nil // not replaced as one version: the records stay too
		}
	case err != nil:
		return 0, 0, fmt.Errorf("rollup %s: %w", day, err)
	}
	keys := make([]string, 0, len(singles))
	for _, r := range singles {
		keys = append(keys, r.Key)
	}
	slices.Sort(keys)
	for chunk := range slices.Chunk(keys, 1000) {
		if err := st.Delete(ctx, chunk...); err != nil {
			return len(byKey), deleted, fmt.Errorf("rollup %s written; its records not deleted: %w", day, err)
		}
		deleted += len(chunk)
	}
	return len(byKey), deleted, nil
}
