//go:build linux

// Command cluster starts a private RabbitMQ cluster (see package
// internal/testenv/cluster) for `make cluster`, prints its AMQP URLs
// comma-separated on the first line and its node names on the second, and
// stops it and removes its files on SIGINT or SIGTERM.
//
//	go run ./internal/testenv/cluster/cmd [-n 3] [-plugins name,...]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv/cluster"
)

func main() {
	n := flag.Int("n", 3, "number of nodes")
	plugins := flag.String("plugins", "", "comma-separated plugins to enable on every node (none needed by mailroom)")
	flag.Parse()

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	var list []string
	for p := range strings.SplitSeq(*plugins, ",") {
		if p = strings.TrimSpace(p); p != "" {
			list = append(list, p)
		}
	}
	began := time.Now()
	fmt.Fprintf(os.Stderr, "starting %d RabbitMQ nodes...\n", *n)
	c, stop, err := cluster.StartNodes(ctx, *n, list...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cluster: %v\n", err)
		os.Exit(1)
	}
	nodes := make([]string, *n)
	for i := range nodes {
		nodes[i] = c.Node(i)
	}
	fmt.Println(strings.Join(c.URLs(), ","))
	fmt.Println(strings.Join(nodes, ","))
	fmt.Fprintf(os.Stderr, "up in %s; Ctrl-C (SIGINT) or SIGTERM stops the cluster\n", time.Since(began).Round(time.Millisecond))

	<-ctx.Done()
	fmt.Fprintln(os.Stderr, "stopping...")
	if err := stop(); err != nil {
		fmt.Fprintf(os.Stderr, "cluster: stop: %v\n", err)
		os.Exit(1)
	}
}
