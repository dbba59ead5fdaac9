//go:build linux

// Package cluster starts a private RabbitMQ cluster of n nodes on this
// machine, for tests that need several brokers (quorum queues, node loss,
// consistent-hash exchanges across nodes).
//
// The nodes run from the installed RabbitMQ (Debian's
// /usr/lib/rabbitmq/bin scripts; $MAILROOM_RABBITMQ_BIN overrides the
// directory) as child processes of the test, each in its own process group,
// with everything private: node names mrt<pid>-<counter>-<i>@localhost, a
// temporary directory for data, logs and configuration, a private Erlang
// cookie, and free loopback ports for AMQP, Erlang distribution and any
// listener an enabled plugin opens. The machine's own broker (rabbit@…, port
// 5672, /etc/rabbitmq) is never read, stopped or reconfigured: its
// rabbitmq-env.conf, rabbitmq.conf, conf.d, advanced.config and
// enabled_plugins are all replaced by private files. Only the shared epmd
// (port 4369) is used, to register the private node names.
package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// Timeouts of the whole start (Start, unless the test's deadline is
// sooner), of one rabbitmqctl call, and of StopNode/StartNode.
const (
	startTimeout = 3 * time.Minute
	ctlTimeout   = 2 * time.Minute
	nodeTimeout  = 2 * time.Minute
	pollEvery    = 100 * time.Millisecond
)

// BinEnv names the environment variable that overrides the directory of
// the real rabbitmq-server and rabbitmqctl scripts.
const BinEnv = "MAILROOM_RABBITMQ_BIN"

// Cluster is a running private RabbitMQ cluster; see Start.
type Cluster struct {
	bin   string // directory of rabbitmq-server and rabbitmqctl
	dir   string // temporary directory holding everything
	nodes []*node

	mu      sync.Mutex
	appDown []bool // StopNode'd and not StartNode'd since

	phases []string // how long each step of boot took, for Start's log
}

type node struct {
	name     string // mrt<pid>-<counter>-<i>@localhost
	dir      string
	amqpPort int
	distPort int
	env      []string // for rabbitmq-server and rabbitmqctl alike

	cmd     *exec.Cmd
	exited  chan struct{} // closed when rabbitmq-server has exited
	waitErr error         // its exit status, set before exited closes
}

var errNotInstalled = errors.New("rabbitmq-server is not installed")

// counter makes node names unique between Start calls of one process; the
// pid makes them unique between processes.
var counter atomic.Int64

// Start starts n nodes (n >= 1) under a temporary directory, joins them into
// one cluster, enables plugins on every node (e.g.
// "rabbitmq_consistent_hash_exchange"), waits until all are running and
// clustered, and registers t.Cleanup to stop all nodes and remove their
// files (even when the test fails). It fails the test when it cannot; when
// RabbitMQ is not installed it skips the test instead, unless CI=true.
func Start(t testing.TB, n int, plugins ...string) *Cluster {
	t.Helper()
	if _, err := binDir(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("cluster: %v", err)
		}
		t.Skipf("cluster: %v", err)
	}
	timeout := startTimeout
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok && time.Until(dl)-10*time.Second < timeout {
			timeout = time.Until(dl) - 10*time.Second
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	began := time.Now()
	c, stop, err := StartNodes(ctx, n, plugins...)
	if err != nil {
		t.Fatalf("cluster: start %d RabbitMQ nodes: %v", n, err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("cluster: stop: %v", err)
		}
	})
	t.Logf("cluster: %d RabbitMQ nodes up in %s (%s): %s", n, time.Since(began).Round(time.Millisecond),
		strings.Join(c.phases, ", "), strings.Join(c.URLs(), ","))
	return c
}

// StartNodes is Start without testing.TB: it returns the cluster and a stop
// function that stops every node, kills what is left of them and removes
// their files (it may be called more than once). On error nothing is left
// running.
func StartNodes(ctx context.Context, n int, plugins ...string) (*Cluster, func() error, error) {
	if n < 1 {
		return nil, nil, fmt.Errorf("need at least one node, not %d", n)
	}
	bin, err := binDir()
	if err != nil {
		return nil, nil, err
	}
	c, err := prepare(bin, n, plugins)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	var stopErr error
	stop := func() error {
		once.Do(func() { stopErr = c.stop() })
		return stopErr
	}
	if err := c.boot(ctx); err != nil {
		return nil, nil, errors.Join(err, stop())
	}
	return c, stop, nil
}

// URLs returns amqp://guest:guest@127.0.0.1:<port>/ for each node, in node
// order.
func (c *Cluster) URLs() []string {
	urls := make([]string, len(c.nodes))
	for i := range c.nodes {
		urls[i] = c.URL(i)
	}
	return urls
}

// URL is the AMQP URL of node i (0-based).
func (c *Cluster) URL(i int) string {
	return fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", c.nodes[i].amqpPort)
}

// Node is the Erlang node name of node i, e.g. mrt12345-1-1@localhost.
func (c *Cluster) Node(i int) string { return c.nodes[i].name }

// StopNode stops the RabbitMQ application of node i (rabbitmqctl stop_app;
// the Erlang VM keeps running) and waits until its AMQP port refuses
// connections.
func (c *Cluster) StopNode(t testing.TB, i int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nodeTimeout)
	defer cancel()
	if _, err := c.ctl(ctx, i, "stop_app"); err != nil {
		t.Fatalf("cluster: stop node %d: %v", i, err)
	}
	c.setAppDown(i, true)
	n := c.nodes[i]
	if err := poll(ctx, func() (bool, error) { return !dialable(n.amqpPort), nil }); err != nil {
		t.Fatalf("cluster: node %d (%s) still accepts AMQP on port %d after stop_app: %v", i, n.name, n.amqpPort, err)
	}
}

// StartNode starts the RabbitMQ application of node i again (rabbitmqctl
// start_app) and waits until its AMQP port accepts connections and it runs
// in the cluster with every node not stopped by StopNode.
func (c *Cluster) StartNode(t testing.TB, i int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nodeTimeout)
	defer cancel()
	if _, err := c.ctl(ctx, i, "start_app"); err != nil {
		t.Fatalf("cluster: start node %d: %v", i, err)
	}
	c.setAppDown(i, false)
	if err := c.awaitPort(ctx, i); err != nil {
		t.Fatalf("cluster: start node %d: %v", i, err)
	}
	if err := c.awaitRunning(ctx, i, c.runningNodes()); err != nil {
		t.Fatalf("cluster: start node %d: %v", i, err)
	}
}

// RestartAll stops the RabbitMQ application of every node, one after
// another, then starts them all at once — as RabbitMQ asks of a whole
// cluster's restart: a node started alone may wait for the others'
// tables (started one by one here, the first did, past nodeTimeout) —
// and waits until every node runs in the cluster.
func (c *Cluster) RestartAll(t testing.TB) {
	t.Helper()
	for i := range c.nodes {
		c.StopNode(t, i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), nodeTimeout)
	defer cancel()
	if err := c.each(0, func(i int) error {
		if _, err := c.ctl(ctx, i, "start_app"); err != nil {
			return err
		}
		c.setAppDown(i, false)
		return c.awaitPort(ctx, i)
	}); err != nil {
		t.Fatalf("cluster: start every node again: %v", err)
	}
	if err := c.awaitRunning(ctx, 0, c.runningNodes()); err != nil {
		t.Fatalf("cluster: start every node again: %v", c.withLogs(0, err))
	}
}

// Ctl runs rabbitmqctl -n <node i> args... with the node's environment
// (private cookie, configuration) and returns its standard output; the error
// carries its standard error.
func (c *Cluster) Ctl(i int, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	return c.ctl(ctx, i, args...)
}

// ---- preparation ----

// binDir finds the directory of the real rabbitmq-server and rabbitmqctl
// scripts. Debian's /usr/sbin/rabbitmq-server is a wrapper that su's to the
// rabbitmq user and cds to /var/lib/rabbitmq, which would hand the private
// nodes the system broker's HOME and cookie, so its target directory is
// used instead.
func binDir() (string, error) {
	var dirs []string
	if d := os.Getenv(BinEnv); d != "" {
		dirs = append(dirs, d)
	}
	dirs = append(dirs, "/usr/lib/rabbitmq/bin")
	if p, err := exec.LookPath("rabbitmq-server"); err == nil {
		dirs = append(dirs, filepath.Dir(p))
	}
	for _, d := range dirs {
		if isExec(filepath.Join(d, "rabbitmq-server")) && isExec(filepath.Join(d, "rabbitmqctl")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("%w (looked in %s; install the rabbitmq-server package or set %s)", errNotInstalled, strings.Join(dirs, ", "), BinEnv)
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// listenerPlugins are the plugins that open listeners of their own, with
// the advanced.config entry that puts a listener on 127.0.0.1:%d.
var listenerPlugins = map[string]string{
	"rabbitmq_management": `{rabbitmq_management, [{tcp_config, [{ip, "127.0.0.1"}, {port, %d}]}]}`,
	"rabbitmq_prometheus": `{rabbitmq_prometheus, [{tcp_config, [{ip, "127.0.0.1"}, {port, %d}]}]}`,
	"rabbitmq_web_stomp":  `{rabbitmq_web_stomp, [{tcp_config, [{ip, "127.0.0.1"}, {port, %d}]}]}`,
	"rabbitmq_web_mqtt":   `{rabbitmq_web_mqtt, [{tcp_config, [{ip, "127.0.0.1"}, {port, %d}]}]}`,
	"rabbitmq_stomp":      `{rabbitmq_stomp, [{tcp_listeners, [{"127.0.0.1", %d}]}]}`,
	"rabbitmq_mqtt":       `{rabbitmq_mqtt, [{tcp_listeners, [{"127.0.0.1", %d}]}]}`,
	"rabbitmq_stream":     `{rabbitmq_stream, [{tcp_listeners, [{"127.0.0.1", %d}]}]}`,
}

// reservedPort reports the well-known ports of the machine's broker and its
// tools, never handed to a private node even when free right now.
func reservedPort(p int) bool {
	switch p {
	case 4369, 5671, 5672, 15672, 15692, 25672, 1883, 8883, 61613, 61614, 15674, 15675, 5552:
		return true
	}
	return p >= 35672 && p <= 35682 // rabbitmqctl's default distribution ports
}

var safeName = regexp.MustCompile(`^[a-z0-9_]+$`)

func prepare(bin string, n int, plugins []string) (*Cluster, error) {
	for _, p := range plugins {
		if !safeName.MatchString(p) {
			return nil, fmt.Errorf("plugin name %q is not a plain Erlang atom", p)
		}
	}
	pluginsDir := pluginsDir(bin)
	if pluginsDir != "" {
		for _, p := range plugins {
			if m, _ := filepath.Glob(filepath.Join(pluginsDir, p+"-*")); len(m) == 0 {
				return nil, fmt.Errorf("no plugin %s in %s (RabbitMQ would ignore it)", p, pluginsDir)
			}
		}
	}
	listeners := pluginListeners(pluginsDir, plugins)

	sweep()
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", dirPrefix, os.Getpid()))
	if err != nil {
		return nil, err
	}
	c := &Cluster{bin: bin, dir: dir, appDown: make([]bool, n)}
	fail := func(err error) (*Cluster, error) {
		os.RemoveAll(dir)
		return nil, err
	}

	home := filepath.Join(dir, "home")
	if err := os.Mkdir(home, 0o700); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".erlang.cookie"), []byte(cookie()), 0o400); err != nil {
		return fail(err)
	}

	perNode := 2 + len(listeners)
	ports, err := freePorts(n * perNode)
	if err != nil {
		return fail(fmt.Errorf("pick free ports: %v", err))
	}
	prefix := fmt.Sprintf("mrt%d-%d", os.Getpid(), counter.Add(1))
	enabled := "[" + strings.Join(plugins, ",") + "].\n"
	base := baseEnv()
	for i := range n {
		nd := &node{
			name:     fmt.Sprintf("%s-%d@localhost", prefix, i+1),
			dir:      filepath.Join(dir, fmt.Sprintf("node%d", i+1)),
			amqpPort: ports[i*perNode],
			distPort: ports[i*perNode+1],
			exited:   make(chan struct{}),
		}
		for _, sub := range []string{"", "log", "mnesia", "conf.d"} {
			if err := os.MkdirAll(filepath.Join(nd.dir, sub), 0o700); err != nil {
				return fail(err)
			}
		}
		conf := fmt.Sprintf("listeners.tcp.local = 127.0.0.1:%d\nlog.file.level = info\nlog.console = false\n", nd.amqpPort)
		var advanced []string
		for j, l := range listeners {
			advanced = append(advanced, fmt.Sprintf(listenerPlugins[l], ports[i*perNode+2+j]))
		}
		files := map[string]string{
			"rabbitmq.conf":     conf,
			"advanced.config":   "[" + strings.Join(advanced, ",\n ") + "].\n",
			"enabled_plugins":   enabled,
			"rabbitmq-env.conf": "# empty: keeps /etc/rabbitmq/rabbitmq-env.conf away from this node\n",
		}
		for name, text := range files {
			if err := os.WriteFile(filepath.Join(nd.dir, name), []byte(text), 0o600); err != nil {
				return fail(err)
			}
		}
		mnesia := filepath.Join(nd.dir, "mnesia")
		nd.env = append(slices.Clip(base),
			"HOME="+home,
			"LC_ALL=C.UTF-8",
			"ERL_CRASH_DUMP="+filepath.Join(nd.dir, "log", "erl_crash.dump"),
			"ERL_EPMD_ADDRESS=127.0.0.1", // only if this node has to start epmd itself
			"RABBITMQ_CONF_ENV_FILE="+filepath.Join(nd.dir, "rabbitmq-env.conf"),
			"RABBITMQ_NODENAME="+nd.name,
			"RABBITMQ_USE_LONGNAME=false",
			"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
			"RABBITMQ_NODE_PORT="+strconv.Itoa(nd.amqpPort),
			"RABBITMQ_DIST_PORT="+strconv.Itoa(nd.distPort),
			"RABBITMQ_MNESIA_BASE="+mnesia,
			"RABBITMQ_MNESIA_DIR="+filepath.Join(mnesia, nd.name),
			"RABBITMQ_LOG_BASE="+filepath.Join(nd.dir, "log"),
			"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(nd.dir, "enabled_plugins"),
			"RABBITMQ_CONFIG_FILE="+filepath.Join(nd.dir, "rabbitmq.conf"),
			"RABBITMQ_CONFIG_FILES="+filepath.Join(nd.dir, "conf.d"),
			"RABBITMQ_ADVANCED_CONFIG_FILE="+filepath.Join(nd.dir, "advanced.config"),
			"RABBITMQ_PID_FILE="+filepath.Join(nd.dir, "rabbitmq.pid"),
			"RABBITMQ_MOTD_FILE="+filepath.Join(nd.dir, "motd"),
			// Distribution on loopback only (the system broker gets this
			// from its ERL_FLAGS in rabbitmq-env.conf).
			"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
			"RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
			// rabbitmqctl listens on the first free port of 35672-35682 by
			// default: eleven ports shared with every other rabbitmqctl on
			// the machine. 0-0 makes it take any free port.
			"RABBITMQ_CTL_DIST_PORT_MIN=0",
			"RABBITMQ_CTL_DIST_PORT_MAX=0",
		)
		c.nodes = append(c.nodes, nd)
	}
	return c, nil
}

// dirPrefix starts the name of each cluster's temporary directory, followed
// by the pid of the process that made it.
const dirPrefix = "mailroom-rabbit-"

// sweep removes the directories of clusters whose process died without
// cleaning up (its nodes got SIGTERM through Pdeathsig).
func sweep() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*-*"))
	for _, d := range dirs {
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), dirPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(d)
		}
	}
}

// pluginsDir is the plugins directory of the installation whose scripts
// are in bin (they are symlinks into …/rabbitmq_server-<version>/sbin on
// Debian), or "" if there is none where it should be.
func pluginsDir(bin string) string {
	real, err := filepath.EvalSymlinks(filepath.Join(bin, "rabbitmq-server"))
	if err != nil {
		return ""
	}
	dir := filepath.Join(filepath.Dir(filepath.Dir(real)), "plugins")
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return ""
	}
	return dir
}

// pluginListeners returns the plugins among plugins and everything they
// depend on (read from the plugins' .app files) that open listeners.
func pluginListeners(pluginsDir string, plugins []string) []string {
	apps := regexp.MustCompile(`\{applications,\s*\[([^\]]*)\]`)
	seen := map[string]bool{}
	var visit func(string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		matches, _ := filepath.Glob(filepath.Join(pluginsDir, p+"-*", "ebin", p+".app"))
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err != nil {
				continue
			}
			if sm := apps.FindSubmatch(b); sm != nil {
				for _, dep := range strings.Split(string(sm[1]), ",") {
					if dep = strings.Trim(strings.TrimSpace(dep), "'"); strings.HasPrefix(dep, "rabbitmq_") {
						visit(dep)
					}
				}
			}
		}
	}
	for _, p := range plugins {
		visit(p)
	}
	var out []string
	for p := range seen {
		if _, ok := listenerPlugins[p]; ok {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// freePorts returns n distinct loopback ports that were free a moment ago
// and are none of the well-known RabbitMQ ports.
func freePorts(n int) ([]int, error) {
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 10*n+100 {
			return nil, errors.New("no free ports")
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, l) // held until all are picked, so none repeats
		if p := l.Addr().(*net.TCPAddr).Port; !reservedPort(p) {
			ports = append(ports, p)
		}
	}
	return ports, nil
}

func cookie() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = 'A' + b[i]%26
	}
	return string(b)
}

// baseEnv is this process's environment without anything that would point
// RabbitMQ or Erlang elsewhere: every RABBITMQ_ variable, their unprefixed
// forms (which rabbitmq-env.conf uses and RabbitMQ also reads), HOME and the
// ERL_ flags.
func baseEnv() []string {
	unprefixed := map[string]bool{
		"HOME": true, "ERL_FLAGS": true, "ERL_AFLAGS": true, "ERL_ZFLAGS": true, "ERL_LIBS": true,
		"ERL_CRASH_DUMP": true, "ERL_EPMD_ADDRESS": true, "LC_ALL": true, "SYS_PREFIX": true,
		"CONF_ENV_FILE": true, "NODENAME": true, "USE_LONGNAME": true, "NODE_IP_ADDRESS": true,
		"NODE_PORT": true, "DIST_PORT": true, "MNESIA_BASE": true, "MNESIA_DIR": true, "QUORUM_DIR": true,
		"LOG_BASE": true, "LOGS": true, "LOG": true, "UPGRADE_LOG": true, "CONFIG_FILE": true,
		"CONFIG_FILES": true, "ADVANCED_CONFIG_FILE": true, "ENABLED_PLUGINS_FILE": true,
		"ENABLED_PLUGINS": true, "PLUGINS_DIR": true, "PLUGINS_EXPAND_DIR": true, "PID_FILE": true,
		"FEATURE_FLAGS_FILE": true, "FEATURE_FLAGS": true, "MOTD_FILE": true, "SERVER_ERL_ARGS": true,
		"SERVER_ADDITIONAL_ERL_ARGS": true, "SERVER_START_ARGS": true, "CTL_ERL_ARGS": true,
		"CTL_DIST_PORT_MIN": true, "CTL_DIST_PORT_MAX": true, "ALLOW_INPUT": true, "DBG": true,
		"KEEP_PID_FILE_ON_EXIT": true, "BOOT_MODULE": true, "NODE_ONLY": true,
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "RABBITMQ_") || unprefixed[k] {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// ---- boot ----

// boot starts every VM at once, waits for all, then joins nodes 2..n to
// node 1: stop_app on all of them at once, join_cluster one at a time,
// start_app on all at once.
func (c *Cluster) boot(ctx context.Context) error {
	last := time.Now()
	phase := func(name string) {
		c.phases = append(c.phases, fmt.Sprintf("%s %s", name, time.Since(last).Round(10*time.Millisecond)))
		last = time.Now()
	}
	for _, n := range c.nodes {
		if err := c.spawn(n); err != nil {
			return err
		}
	}
	if err := c.each(0, func(i int) error { return c.awaitApp(ctx, i) }); err != nil {
		return err
	}
	phase("boot")
	if len(c.nodes) == 1 {
		return nil
	}
	if err := c.each(1, func(i int) error { _, err := c.ctl(ctx, i, "stop_app"); return err }); err != nil {
		return err
	}
	phase("stop_app")
	for i := 1; i < len(c.nodes); i++ {
		if _, err := c.ctl(ctx, i, "join_cluster", c.nodes[0].name); err != nil {
			return c.withLogs(i, err)
		}
	}
	phase("join_cluster")
	if err := c.each(1, func(i int) error {
		if _, err := c.ctl(ctx, i, "start_app"); err != nil { // returns once started
			return err
		}
		return c.awaitPort(ctx, i)
	}); err != nil {
		return err
	}
	phase("start_app")
	// Node 1's view is the cluster's: every node a member and running.
	err := c.awaitRunning(ctx, 0, c.runningNodes())
	phase("cluster_status")
	if err != nil {
		return c.withLogs(0, err)
	}
	return nil
}

// each runs f for nodes from..n-1 at once and joins their errors, each with
// the tail of its node's logs.
func (c *Cluster) each(from int, f func(i int) error) error {
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i := from; i < len(c.nodes); i++ {
		wg.Go(func() {
			if err := f(i); err != nil {
				errs[i] = c.withLogs(i, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// spawn starts rabbitmq-server for n in the foreground of a process group
// of its own. Pdeathsig makes the kernel send SIGTERM to it (which the
// script turns into a clean shutdown) if this process dies without
// cleaning up, e.g. on a test timeout.
func (c *Cluster) spawn(n *node) error {
	out, err := os.Create(filepath.Join(n.dir, "log", "startup.log"))
	if err != nil {
		return err
	}
	defer out.Close()
	cmd := exec.Command(filepath.Join(c.bin, "rabbitmq-server"))
	cmd.Env = n.env
	cmd.Dir = n.dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := startOnLockedThread(cmd); err != nil {
		return fmt.Errorf("start %s: %v", cmd.Path, err)
	}
	n.cmd = cmd
	go func() {
		n.waitErr = cmd.Wait()
		close(n.exited)
	}()
	return nil
}

// Pdeathsig fires when the OS thread that forked the child exits, not the
// process, and the Go runtime may end threads; so children are forked from
// one goroutine locked to a thread that lives as long as the process.
var (
	spawnOnce sync.Once
	spawnReqs chan spawnReq
)

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func startOnLockedThread(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReqs = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread must not end
			for r := range spawnReqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, done: make(chan error, 1)}
	spawnReqs <- r
	return <-r.done
}

// awaitApp waits until node i's AMQP port accepts connections (cheap to
// poll; it opens late in the boot, after the plugins) and then until
// rabbitmqctl await_startup reports it booted.
func (c *Cluster) awaitApp(ctx context.Context, i int) error {
	if err := c.awaitPort(ctx, i); err != nil {
		return err
	}
	// await_startup fails at once while the node is not reachable yet.
	var last error
	err := poll(ctx, func() (bool, error) {
		_, last = c.ctl(ctx, i, "await_startup", "--timeout", "60")
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("await_startup: %w (last: %v)", err, last)
	}
	return nil
}

// awaitPort waits until node i's AMQP port accepts connections, failing
// early if its rabbitmq-server exits.
func (c *Cluster) awaitPort(ctx context.Context, i int) error {
	n := c.nodes[i]
	err := poll(ctx, func() (bool, error) {
		select {
		case <-n.exited:
			return false, fmt.Errorf("rabbitmq-server exited: %v", n.waitErr)
		default:
		}
		return dialable(n.amqpPort), nil
	})
	if err != nil {
		return fmt.Errorf("wait for AMQP port %d: %w", n.amqpPort, err)
	}
	return nil
}

// awaitRunning waits until node i's cluster_status lists want as its
// running nodes and every node of the cluster as a member.
func (c *Cluster) awaitRunning(ctx context.Context, i int, want []string) error {
	var last string
	err := poll(ctx, func() (bool, error) {
		st, err := c.status(ctx, i)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = fmt.Sprintf("running %v, disc %v", st.Running, st.Disk)
		for _, n := range c.nodes {
			if !slices.Contains(st.Disk, n.name) {
				return false, nil
			}
		}
		for _, w := range want {
			if !slices.Contains(st.Running, w) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("node %s does not see %v running: %w (last: %s)", c.nodes[i].name, want, err, last)
	}
	return nil
}

type clusterStatus struct {
	Running []string `json:"running_nodes"`
	Disk    []string `json:"disk_nodes"`
}

func (c *Cluster) status(ctx context.Context, i int) (clusterStatus, error) {
	var st clusterStatus
	out, err := c.ctl(ctx, i, "cluster_status", "--formatter", "json")
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return st, fmt.Errorf("cluster_status: %v: %q", err, out)
	}
	return st, nil
}

func (c *Cluster) setAppDown(i int, down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.appDown[i] = down
}

// runningNodes names the nodes whose application is not stopped by
// StopNode.
func (c *Cluster) runningNodes() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var names []string
	for i, n := range c.nodes {
		if !c.appDown[i] {
			names = append(names, n.name)
		}
	}
	return names
}

// ---- stop ----

// stop stops all nodes at once (rabbitmqctl stop), kills each process group
// that is still alive after that, and removes the directory.
func (c *Cluster) stop() error {
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i, n := range c.nodes {
		if n.cmd == nil {
			continue
		}
		wg.Go(func() { errs[i] = c.stopNode(i) })
	}
	wg.Wait()
	if err := os.RemoveAll(c.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (c *Cluster) stopNode(i int) error {
	n := c.nodes[i]
	pgid := n.cmd.Process.Pid
	select {
	case <-n.exited:
	default:
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, _ = c.ctl(ctx, i, "stop") // the kill below is the fallback
		cancel()
		select {
		case <-n.exited:
		case <-time.After(30 * time.Second):
		}
	}
	// Also sweeps leftovers of the group (erl_child_setup, inet_gethost).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case <-n.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("node %s (process group %d) did not exit even after SIGKILL", n.name, pgid)
	}
}

// ---- helpers ----

// ctl runs rabbitmqctl -n <node i> args... in node i's environment.
func (c *Cluster) ctl(ctx context.Context, i int, args ...string) (string, error) {
	n := c.nodes[i]
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "rabbitmqctl"), append([]string{"-n", n.name}, args...)...)
	cmd.Env = n.env
	cmd.Dir = n.dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if err != nil {
		msg := strings.TrimSpace(stderr.String() + "\n" + out)
		return out, fmt.Errorf("rabbitmqctl -n %s %s: %v: %s", n.name, strings.Join(args, " "), err, msg)
	}
	return out, nil
}

// withLogs adds the tails of node i's startup output and log to err.
func (c *Cluster) withLogs(i int, err error) error {
	n := c.nodes[i]
	return fmt.Errorf("node %d (%s): %w\n--- %s (tail):\n%s\n--- %s (tail):\n%s", i+1, n.name, err,
		"startup.log", tail(filepath.Join(n.dir, "log", "startup.log"), 15),
		n.name+".log", tail(filepath.Join(n.dir, "log", n.name+".log"), 15))
}

func tail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

func dialable(port int) bool {
	conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// poll calls cond every pollEvery until it reports true or an error, or ctx
// ends.
func poll(ctx context.Context, cond func() (bool, error)) error {
	for {
		ok, err := cond()
		if err != nil || ok {
			return err
		}
		if !wait.Sleep(ctx, pollEvery) {
			return ctx.Err()
		}
	}
}

// Private starts n private nodes (one cluster) and makes them the broker
// of this test process and of the processes it starts (testenv.UseBroker:
// AMQP_URL lists every node; testenv.Ctl runs on the first), so a package
// whose tests stop, restart or alarm the broker faults only its own. For
// TestMain; it exits the process when the nodes cannot start (with
// CI=true) or skips the package otherwise. stop stops them.
func Private(n int, plugins ...string) (c *Cluster, stop func()) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, stopNodes, err := StartNodes(ctx, n, plugins...)
	if err != nil {
		if os.Getenv("CI") != "true" {
			fmt.Fprintln(os.Stderr, "SKIP: cannot start private RabbitMQ nodes (set CI=true to fail instead):", err)
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "FAIL: start private RabbitMQ nodes:", err)
		os.Exit(1)
	}
	testenv.UseBroker(strings.Join(c.URLs(), ","), func(args ...string) (string, error) { return c.Ctl(0, args...) })
	return c, func() {
		if err := stopNodes(); err != nil {
			fmt.Fprintln(os.Stderr, "stop the private RabbitMQ nodes:", err)
		}
	}
}
