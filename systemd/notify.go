package systemd

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/login1"
	"github.com/godbus/dbus/v5"
)

// Notifier speaks sd_notify: READY, STATUS, STOPPING and watchdog pings.
// Outside systemd every call does nothing.
type Notifier struct{ Log *slog.Logger }

func (n Notifier) send(state string) {
	if ok, err := daemon.SdNotify(false, state); err != nil && n.Log != nil {
		n.Log.Warn("sd_notify", "state", state, "err", err)
	} else if ok && n.Log != nil {
		n.Log.Debug("sd_notify", "state", state)
	}
}

// Ready says the providers are up.
func (n Notifier) Ready(status string) { n.send(daemon.SdNotifyReady + "\nSTATUS=" + status) }

// Stopping says preemptd is on its way out.
func (n Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

// Watchdog pings at half the unit's WatchdogSec until ctx ends.
func (n Notifier) Watchdog(ctx context.Context) {
	every, err := daemon.SdWatchdogEnabled(false)
	if err != nil || every == 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			n.send(daemon.SdNotifyWatchdog)
		}
	}
}

// Inhibitor is a logind "delay" inhibitor lock on shutdown: logind waits
// (up to InhibitDelayMaxSec) until it is released, and tells preemptd that
// the machine is about to shut down.
type Inhibitor struct {
	conn *login1.Conn
	lock *os.File
	log  *slog.Logger
	once sync.Once
}

// Inhibit takes the lock; without logind (a container, a laptop without
// systemd) it returns nil and says why at debug level.
func Inhibit(log *slog.Logger) *Inhibitor {
	conn, err := login1.New()
	if err != nil {
		log.Debug("no logind: shutdown is not delayed for the emergency path", "err", err)
		return nil
	}
	f, err := conn.Inhibit("shutdown", "preemptd", "making the last checkpoint durable", "delay")
	if err != nil {
		conn.Close()
		log.Warn("could not take a logind delay lock on shutdown", "err", err)
		return nil
	}
	log.Info("holding a logind delay lock on shutdown")
	return &Inhibitor{conn: conn, lock: f, log: log}
}

// OnShutdown calls f when logind announces the shutdown (PrepareForShutdown
// true), until ctx ends.
func (i *Inhibitor) OnShutdown(ctx context.Context, f func()) {
	ch := i.conn.Subscribe("PrepareForShutdown")
	for {
		select {
		case <-ctx.Done():
			return
		case sig, ok := <-ch:
			if !ok {
				return
			}
			if starting, _ := sigBool(sig); starting {
				i.log.Warn("logind: the machine is shutting down")
				f()
			}
		}
	}
}

func sigBool(s *dbus.Signal) (bool, bool) {
	if s == nil || len(s.Body) == 0 {
		return false, false
	}
	b, ok := s.Body[0].(bool)
	return b, ok
}

// Release lets the shutdown go on.
func (i *Inhibitor) Release() {
	if i == nil {
		return
	}
	i.once.Do(func() {
		i.lock.Close()
		i.conn.Close()
		i.log.Info("released the logind delay lock")
	})
}
