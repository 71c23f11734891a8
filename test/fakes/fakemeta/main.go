// Command fakemeta serves the GCP or Azure metadata fake of package fakes
// as a process of its own (for benchmarks: the daemon, the server and the
// measuring harness each in their own process), with a control endpoint:
//
//	POST /control/gcp?path=instance/preempted&value=TRUE
//	POST /control/azure   (body: a JSON list of fakes.AzureEvent)
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"

	"github.com/preemptd/preemptd/test/fakes"
)

func main() {
	cloud := flag.String("cloud", "gcp", "gcp or azure")
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	vm := flag.String("vm", "vm-bench", "Azure VM name")
	flag.Parse()
	mux := http.NewServeMux()
	switch *cloud {
	case "gcp":
		g := fakes.NewGCP()
		mux.Handle("/computeMetadata/", g)
		mux.HandleFunc("POST /control/gcp", func(w http.ResponseWriter, r *http.Request) {
			g.Set(r.URL.Query().Get("path"), r.URL.Query().Get("value"))
		})
	case "azure":
		a := fakes.NewAzure(*vm)
		mux.Handle("/metadata/", a)
		mux.HandleFunc("POST /control/azure", func(w http.ResponseWriter, r *http.Request) {
			var evs []fakes.AzureEvent
			if err := json.NewDecoder(r.Body).Decode(&evs); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			a.SetEvents(evs...)
		})
	default:
		fmt.Fprintln(os.Stderr, "fakemeta: --cloud is gcp or azure")
		os.Exit(2)
	}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(l.Addr().String()) // the harness reads the address
	log.Fatal(http.Serve(l, mux))
}
