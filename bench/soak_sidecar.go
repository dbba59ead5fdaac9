package main

import (
	"fmt"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// sidecarPID finds the process of the sidecar startSidecar started: the
// one running the binary this process built.
func sidecarPID() (int, error) {
	bin, err := sidecarBin()
	if err != nil {
		return 0, err
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		dirs, _ := os.ReadDir("/proc")
		for _, e := range dirs {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if exe, _ := os.Readlink("/proc/" + e.Name() + "/exe"); exe == bin {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("soak: no process runs %s", bin)
}

// sidecarClaims reads the claim histogram from the sidecar's /metrics. It
// listens on a port of the kernel's choosing (--http 127.0.0.1:0), found
// once it listens.
func sidecarClaims(pid int) func() (histSnap, bool) {
	var addr string
	return func() (histSnap, bool) {
		if addr == "" {
			if addr = listenAddr(pid); addr == "" {
				return histSnap{}, false
			}
		}
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return histSnap{}, false
		}
		defer resp.Body.Close()
		parser := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := parser.TextToMetricFamilies(resp.Body)
		if err != nil {
			return histSnap{}, false
		}
		f := fams["mailroom_relay_claim_duration_seconds"]
		if f == nil || len(f.GetMetric()) == 0 {
			return histSnap{}, false
		}
		h := f.GetMetric()[0].GetHistogram()
		s := histSnap{count: h.GetSampleCount(), sum: h.GetSampleSum()}
		var below uint64 // Prometheus buckets are cumulative
		for _, b := range h.GetBucket() {
			if math.IsInf(b.GetUpperBound(), 1) {
				continue // the count beyond every bound comes last
			}
			s.bounds = append(s.bounds, b.GetUpperBound())
			s.counts = append(s.counts, b.GetCumulativeCount()-below)
			below = b.GetCumulativeCount()
		}
		s.counts = append(s.counts, s.count-below)
		return s, true
	}
}

// listenAddr is the loopback address pid listens on ("" if none yet):
// the port of a listening socket of /proc/<pid>/net/tcp whose inode is
// one of its file descriptors (startSidecar binds 127.0.0.1).
func listenAddr(pid int) string {
	inodes := map[string]bool{}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if in, ok := strings.CutPrefix(l, "socket:["); ok {
			inodes[strings.TrimSuffix(in, "]")] = true
		}
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)                       // sl local rem st … inode (field 9)
		if len(f) > 9 && f[3] == "0A" && inodes[f[9]] { // 0A: LISTEN
			_, port, _ := strings.Cut(f[1], ":")
			p, err := strconv.ParseUint(port, 16, 16)
			if err == nil {
				return fmt.Sprintf("127.0.0.1:%d", p)
			}
		}
	}
	return ""
}
