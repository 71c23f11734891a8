# preemptd — `make run` starts the daemon on embedded defaults, `make test`
# runs every test. go-nvml needs cgo and a dynamically linked (glibc) binary:
# keep CGO_ENABLED=1 and never build with -static.

GO          ?= go
export CGO_ENABLED := 1
export CGO_CFLAGS  := -Wno-deprecated-declarations
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
BIN         := bin/preemptd
LOCAL       := $(CURDIR)/.preemptd
TOOLS        = $(shell scripts/tools.sh)

.PHONY: all build run demo test test-short lint tools fuzz bench chaos package wheel frameworks-table clean

all: build

build:
	@[ -x $(BIN) ] || echo "build: compiling $(BIN) with cgo (the first build compiles NVML's bindings and the cloud clients: one to three minutes on 2 cores)"
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/preemptd

## run: the daemon on embedded defaults — local provider, state under
## ./.preemptd, described by ./.preemptd/preemptd.yaml so that every other
## command finds the same socket and store with --config .preemptd/preemptd.yaml
run: build
	@mkdir -p $(LOCAL)
	@printf '# written by make run\nprovider: local\nrun_dir: %s\nstate_dir: %s\n' $(LOCAL)/run $(LOCAL)/state > $(LOCAL)/preemptd.yaml
	@echo "run: config $(LOCAL)/preemptd.yaml; in another shell: $(BIN) simulate --config .preemptd/preemptd.yaml (likewise status, ls, restore, report)"
	$(BIN) run --config $(LOCAL)/preemptd.yaml $(ARGS)

## demo: a scripted preemption — daemon, a sample trainer, `preemptd simulate`
demo: build
	examples/demo.sh $(BIN)

tools:
	@scripts/tools.sh >/dev/null

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

## test: every test, after installing the pinned peers they run against
test: tools lint
	PREEMPTD_TOOLS=$(TOOLS) $(GO) test -race -count=1 -timeout 30m -json ./... | $(GO) run ./scripts/testsum

test-short: tools
	PREEMPTD_TOOLS=$(TOOLS) $(GO) test -short -count=1 ./...

## frameworks-table: the framework trials (TestFrameworks, which make test
## runs too), their table of what was shown written into README.md
frameworks-table: tools
	PREEMPTD_TOOLS=$(TOOLS) PREEMPTD_FRAMEWORK_TABLE=$(CURDIR)/README.md $(GO) test -count=1 -timeout 40m -run 'TestFrameworks$$' -v ./test/e2e

## wheel: the Python helper's wheel in dist/python, built offline (flit_core cached by tools)
wheel: tools
	scripts/wheel.sh $(CURDIR)/dist/python

## package: .deb and .rpm in $(DIST) (nfpm, pinned; default dist/, the tests use a temp dir)
DIST        ?= dist
ARCH        := $(shell go env GOARCH)
PKG_VERSION ?= $(shell git describe --tags --match 'v[0-9]*' 2>/dev/null | sed 's/^v//' | grep . || echo 0.1.0~git$$(git rev-parse --short HEAD 2>/dev/null || echo dev))
package: build
	@mkdir -p $(DIST)
	for p in deb rpm; do \
		PREEMPTD_VERSION=$(PKG_VERSION) PREEMPTD_ARCH=$(ARCH) $$(scripts/tools.sh)/nfpm-v2.45.2/nfpm pkg \
			--config deploy/package/nfpm.yaml --packager $$p --target $(DIST)/ || exit 1; \
	done
	@ls -l $(DIST)/

## bench: preemptd against its peers on this machine; writes test/bench/RESULTS.md
bench:
	@scripts/tools.sh bench >/dev/null
	printf '# Benchmarks\n\nWritten by `make bench`; every figure is from the run below, on this machine.\n\n' > test/bench/RESULTS.md
	PREEMPTD_TOOLS=$$(scripts/tools.sh bench) PREEMPTD_BENCH=1 BENCH_OUT=$(CURDIR)/test/bench/RESULTS.md \
		$(GO) test -count=1 -timeout 60m -v -run . ./test/bench/

## chaos: the fault suite in full, with a summary table (the short form runs in `make test`)
chaos: tools
	scripts/chaos.sh

## fuzz: a short pass over every parser's fuzz target (seed corpora in testdata/fuzz)
FUZZTIME ?= 10s
fuzz:
	$(GO) test ./agent/config -run '^$$' -fuzz FuzzLoad -fuzztime $(FUZZTIME)
	$(GO) test ./providers/aws -run '^$$' -fuzz FuzzParseInstanceAction -fuzztime $(FUZZTIME)
	$(GO) test ./providers/aws -run '^$$' -fuzz FuzzParseScheduled -fuzztime $(FUZZTIME)
	$(GO) test ./providers/gcp -run '^$$' -fuzz FuzzParsePreempted -fuzztime $(FUZZTIME)
	$(GO) test ./providers/azure -run '^$$' -fuzz FuzzParseDocument -fuzztime $(FUZZTIME)
	$(GO) test ./providers/local -run '^$$' -fuzz FuzzParseTrigger -fuzztime $(FUZZTIME)
	$(GO) test ./checkpoint -run '^$$' -fuzz FuzzParseManifest -fuzztime $(FUZZTIME)

clean:
	rm -rf bin dist $(LOCAL)
