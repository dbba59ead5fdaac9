package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"html/template"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mailroom-go/mailroom/relay"
)

//go:embed page.html
var pageHTML string

var pageTmpl = template.Must(template.New("page").Funcs(template.FuncMap{
	"ago": func(t time.Time) string { return time.Since(t).Round(time.Second).String() + " ago" },
	"ts":  func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"dur": func(d time.Duration) string { return fmtSeconds(d.Seconds()) },
}).Parse(pageHTML))

// pageDeadLimit is how many dead letters the page lists.
const pageDeadLimit = 50

type pageData struct {
	Name, Version string
	Now           time.Time
	Uptime        string
	Ready         bool
	Checks        []check
	Status        relay.StatusReport
	StatusErr     string
	Horizon       relay.HorizonReport
	HorizonErr    string
	HorizonLine   string // horizonLine
	HorizonPast   bool   // past --horizon-warn
	Stats         relay.Stats
	Throughput    chart
	Lag           chart
	Dead          []relay.DeadLetter
	Filter        relay.DeadFilter // from the query: ?exchange=&type=&error=
	Filtered      bool
	DeadErr       string
	DeadMore      int64
	Admin         bool
	Done, Err     string
}

// chart is a server-drawn SVG polyline.
type chart struct {
	W, H    int
	Points  string // "x,y x,y ..." in the viewBox
	Max     string // label of the top of the scale
	Last    string
	Span    string // how far back the x axis reaches
	Samples int
}

func (s *server) page(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	d := pageData{
		Name: s.name, Version: buildVersion(), Now: time.Now(), Admin: s.token != "",
		Uptime: time.Since(s.started).Round(time.Second).String(),
		Stats:  s.relay.Stats(), Done: r.URL.Query().Get("done"), Err: r.URL.Query().Get("error"),
	}
	d.Ready, d.Checks = s.readiness(ctx)
	var err error
	if d.Status, err = s.admin.Status(ctx); err != nil {
		d.StatusErr = err.Error()
	}
	if d.Horizon, err = s.admin.Horizon(ctx); err != nil {
		d.HorizonErr = err.Error()
	}
	d.HorizonLine, d.HorizonPast = horizonLine(d.Horizon, s.horizonWarn), horizonPast(d.Horizon, s.horizonWarn)
	q := r.URL.Query()
	d.Filter = relay.DeadFilter{Exchange: q.Get("exchange"), Type: q.Get("type"), Error: q.Get("error")}
	d.Filtered = d.Filter != (relay.DeadFilter{})
	if d.Dead, err = s.admin.ListDeadWhere(ctx, d.Filter, pageDeadLimit); err != nil {
		d.DeadErr = err.Error()
	}
	if !d.Filtered {
		d.DeadMore = max(0, d.Status.Dead-int64(len(d.Dead)))
	}
	samples := s.samp.snapshot()
	d.Throughput = drawChart(samples, func(p sample) float64 { return p.Rate }, "/s")
	d.Lag = drawChart(samples, func(p sample) float64 { return p.Lag }, "s")

	var buf bytes.Buffer
	if err := pageTmpl.Execute(&buf, d); err != nil {
		s.log.Error("status page: template", "error", err)
		http.Error(w, "status page failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	_, _ = w.Write(buf.Bytes())
}

// drawChart scales samples into a 480×120 viewBox, newest on the right.
func drawChart(samples []sample, v func(sample) float64, unit string) chart {
	c := chart{W: 480, H: 120, Samples: len(samples)}
	if len(samples) == 0 {
		c.Max, c.Last, c.Span = "0"+unit, "-", "no samples yet"
		return c
	}
	top := 0.0
	for _, p := range samples {
		top = max(top, v(p))
	}
	scale := top
	if scale == 0 {
		scale = 1
	}
	var b strings.Builder
	n := len(samples)
	for i, p := range samples {
		x := float64(c.W)
		if n > 1 {
			x = float64(i) * float64(c.W) / float64(n-1)
		}
		y := float64(c.H) - v(p)/scale*float64(c.H-4) - 2
		fmt.Fprintf(&b, "%.1f,%.1f ", x, y)
	}
	c.Points = strings.TrimSpace(b.String())
	c.Max = fmtNum(top) + unit
	c.Last = fmtNum(v(samples[n-1])) + unit
	c.Span = "last " + samples[n-1].At.Sub(samples[0].At).Round(time.Second).String()
	return c
}

func fmtNum(f float64) string {
	if f >= 100 || f == float64(int64(f)) {
		return strconv.FormatFloat(f, 'f', 0, 64)
	}
	return strconv.FormatFloat(f, 'f', 1, 64)
}

func fmtSeconds(s float64) string {
	return strconv.FormatFloat(s, 'f', 1, 64) + "s"
}
