package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mailroom-go/mailroom/relay"
)

// server is the sidecar's HTTP side: probes, metrics, the status page and
// its admin actions.
type server struct {
	db          *sql.DB
	admin       *relay.Admin
	relay       *relay.Relay
	watch       *brokerWatch
	samp        *sampler
	reg         *prometheus.Registry
	stall       time.Duration
	token       string        // "" = admin actions disabled
	horizonWarn time.Duration // --horizon-warn: the page flags the vacuum horizon past it
	name        string
	log         *slog.Logger
	started     time.Time
	stopping    atomic.Bool
}

func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.page)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
	mux.HandleFunc("POST /dead/replay", s.action(true))
	mux.HandleFunc("POST /dead/discard", s.action(false))
	return mux
}

// check is one readiness condition.
type check struct {
	Name   string
	OK     bool
	Detail string
}

// readiness checks the database, the broker connection and the relay
// loop's progress.
func (s *server) readiness(ctx context.Context) (bool, []check) {
	var cs []check
	if s.stopping.Load() {
		cs = append(cs, check{"process", false, "stopping (SIGTERM received)"})
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.db.PingContext(pctx); err != nil {
		cs = append(cs, check{"database", false, err.Error()})
	} else {
		cs = append(cs, check{"database", true, "ok"})
	}
	if up, since, lastErr := s.watch.state(); up {
		cs = append(cs, check{"broker", true, "ok"})
	} else {
		cs = append(cs, check{"broker", false, "down for " + time.Since(since).Round(time.Millisecond).String() + ": " + lastErr})
	}
	st := s.relay.Stats()
	switch last := st.LastProgress; {
	case st.Standby && last.UnixNano() > 0 && time.Since(last) <= s.stall:
		cs = append(cs, check{"relay", true, "standing by: another relay publishes (--active-relays)"})
	case last.UnixNano() <= 0:
		cs = append(cs, check{"relay", false, "the relay loop has not claimed yet"})
	case time.Since(last) > s.stall:
		cs = append(cs, check{"relay", false, "no progress for " + time.Since(last).Round(time.Second).String() + " (--stall-timeout " + s.stall.String() + ")"})
	default:
		cs = append(cs, check{"relay", true, "ok"})
	}
	ok := true
	for _, c := range cs {
		ok = ok && c.OK
	}
	return ok, cs
}

func (s *server) readyz(w http.ResponseWriter, r *http.Request) {
	ok, cs := s.readiness(r.Context())
	body := struct {
		Ready  bool              `json:"ready"`
		Checks map[string]string `json:"checks"`
	}{ok, map[string]string{}}
	for _, c := range cs {
		body.Checks[c.Name] = c.Detail
	}
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(body)
}

// action replays or discards the dead letters named by the form's id
// fields (or all, for replay with all=true). It needs the admin token, in
// the form field "token" or as "Authorization: Bearer <token>"; a forged
// cross-site form cannot know it, and cross-origin requests are refused
// outright. A browser is redirected back to the page with the outcome; a
// client sending "Accept: application/json" gets JSON.
func (s *server) action(replay bool) http.HandlerFunc {
	verb := "discard"
	if replay {
		verb = "replay"
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if s.token == "" {
			http.Error(w, "admin actions are disabled: start mailroom-relay run with --admin-token (or MAILROOM_ADMIN_TOKEN)", http.StatusForbidden)
			return
		}
		if !sameOrigin(r) {
			http.Error(w, "cross-origin request refused", http.StatusForbidden)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
		if err := r.ParseForm(); err != nil {
			http.Error(w, "bad form: "+err.Error(), http.StatusBadRequest)
			return
		}
		given := r.PostForm.Get("token")
		if h, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
			given = h
		}
		if !tokenOK(given, s.token) {
			s.log.Warn("admin action refused: wrong or missing token", "action", verb, "remote", r.RemoteAddr)
			http.Error(w, "wrong or missing admin token", http.StatusForbidden)
			return
		}
		ids := r.PostForm["id"]
		all := replay && r.PostForm.Get("all") == "true"
		ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
		defer cancel()
		var n int64
		var err error
		switch {
		case all: // those matching the page's filter, if it had one
			n, err = s.admin.ReplayDeadWhere(ctx, relay.DeadFilter{Exchange: r.PostForm.Get("exchange"), Type: r.PostForm.Get("type"), Error: r.PostForm.Get("error")})
		case len(ids) == 0:
			err = errors.New("select at least one dead letter")
		case replay:
			n, err = s.admin.ReplayDead(ctx, ids)
		default:
			n, err = s.admin.DiscardDead(ctx, ids)
		}
		status := http.StatusOK
		switch {
		case errors.Is(err, relay.ErrDeadLetterNotFound):
			status = http.StatusNotFound
		case errors.Is(err, relay.ErrInvalidID) || (err != nil && len(ids) == 0 && !all):
			status = http.StatusBadRequest
		case err != nil:
			status = http.StatusInternalServerError
		}
		if err != nil {
			s.log.Warn("admin action failed", "action", verb, "ids", ids, "all", all, "error", err, "remote", r.RemoteAddr)
		} else {
			s.log.Info("admin action", "action", verb, "ids", ids, "all", all, "count", n, "remote", r.RemoteAddr)
		}
		if strings.Contains(r.Header.Get("Accept"), "application/json") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			body := map[string]any{verb + "ed": n}
			if err != nil {
				body = map[string]any{"error": err.Error()}
			}
			_ = json.NewEncoder(w).Encode(body)
			return
		}
		q := url.Values{}
		if err != nil {
			q.Set("error", err.Error())
		} else {
			q.Set("done", verb+"ed "+strconv.FormatInt(n, 10)+" dead letter(s)")
		}
		http.Redirect(w, r, "/?"+q.Encode(), http.StatusSeeOther)
	}
}

// tokenOK compares in constant time (hashes first, so the length leaks
// nothing either).
func tokenOK(given, want string) bool {
	g, w := sha256.Sum256([]byte(given)), sha256.Sum256([]byte(want))
	return given != "" && subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// sameOrigin refuses requests a browser marks as cross-site, and requests
// whose Origin is another host. Non-browser clients send neither header.
func sameOrigin(r *http.Request) bool {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
	default:
		return false
	}
	o := r.Header.Get("Origin")
	if o == "" {
		return true
	}
	u, err := url.Parse(o)
	return err == nil && u.Host == r.Host
}
