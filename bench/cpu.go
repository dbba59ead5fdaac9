package main

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cpuUse is CPU time spent, by whom: the machine's two cores are shared by
// PostgreSQL, RabbitMQ and this process, so a figure's cost in CPU says
// more than its rate when the machine is noisy.
type cpuUse struct {
	postgres, rabbitmq, self, machine time.Duration
}

// clockTick is USER_HZ, the unit of /proc's CPU times (100 on Linux).
const clockTick = 10 * time.Millisecond

// readCPU sums /proc: every live process of the postgres and rabbitmq users
// (with the children they have reaped, so exited backends count), this
// process, and the whole machine's busy time.
func readCPU() cpuUse {
	var u cpuUse
	uids := map[uint32]*time.Duration{}
	for name, d := range map[string]*time.Duration{"postgres": &u.postgres, "rabbitmq": &u.rabbitmq} {
		if usr, err := user.Lookup(name); err == nil {
			id, _ := strconv.ParseUint(usr.Uid, 10, 32)
			uids[uint32(id)] = d
		}
	}
	self := os.Getpid()
	dirs, _ := os.ReadDir("/proc")
	for _, e := range dirs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		info, err := os.Stat("/proc/" + e.Name())
		if err != nil {
			continue
		}
		d := uids[info.Sys().(*syscall.Stat_t).Uid]
		if pid == self {
			d = &u.self
		}
		if d == nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command name: state is field 3, utime..cstime 14..17.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		for _, i := range []int{14, 15, 16, 17} {
			t, _ := strconv.ParseInt(f[i-3], 10, 64)
			*d += time.Duration(t) * clockTick
		}
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		for i, v := range f[1:] {
			if i == 3 || i == 4 { // idle, iowait
				continue
			}
			t, _ := strconv.ParseInt(v, 10, 64)
			u.machine += time.Duration(t) * clockTick
		}
	}
	return u
}

func (u cpuUse) since(before cpuUse) cpuUse {
	return cpuUse{u.postgres - before.postgres, u.rabbitmq - before.rabbitmq, u.self - before.self, u.machine - before.machine}
}

// per100k renders u as CPU seconds per 100,000 events.
func (u cpuUse) per100k(events int64) string {
	s := func(d time.Duration) float64 { return d.Seconds() * 100_000 / float64(events) }
	return fmt.Sprintf("PostgreSQL %.1f s, RabbitMQ %.1f s, bench process %.1f s, machine %.1f s", s(u.postgres), s(u.rabbitmq), s(u.self), s(u.machine))
}
