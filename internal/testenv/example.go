package testenv

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"time"

	"github.com/mailroom-go/mailroom"
)

// ExampleEnv is where a runnable Example of a package runs: a fresh
// migrated schema of the local PostgreSQL (DatabaseURL, search_path set to
// it), the local broker, and a Suffix for the example's exchange and queue
// names, so examples run beside the tests without touching theirs.
type ExampleEnv struct {
	DatabaseURL, AMQPURL, Suffix string
	drop                         func()
}

// Example makes an ExampleEnv; Done drops its schema. An example cannot
// skip: a package with runnable examples calls SkipWithoutServices from its
// TestMain, so Example only panics when a service fails midway.
func Example() *ExampleEnv {
	name, u, drop, err := createSchema("ex")
	if err != nil {
		panic(err)
	}
	db, err := sql.Open("postgres", u)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := mailroom.Migrate(ctx, db, mailroom.Tables{}); err != nil {
		panic(fmt.Sprintf("migrate: %v", err))
	}
	return &ExampleEnv{DatabaseURL: u, AMQPURL: AMQPURL(), Suffix: name, drop: func() { drop() }} //nolint:errcheck // best effort, as a test's cleanup
}

// Done drops the example's schema.
func (e *ExampleEnv) Done() { e.drop() }

// SkipWithoutServices is for the TestMain of a package whose runnable
// examples need the services (examples cannot skip themselves): when
// PostgreSQL or, with broker set, RabbitMQ cannot be reached, it prints
// why and how to start it and exits 0 — or, with CI=true, exits 1.
func SkipWithoutServices(broker bool) {
	var err error
	what, start := "PostgreSQL at "+Redact(DatabaseURL()), startPostgres
	db, err := sql.Open("postgres", DatabaseURL())
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = db.PingContext(ctx)
		cancel()
		db.Close()
	}
	if err == nil && broker {
		what, start = "RabbitMQ at "+Redact(AMQPURL()), startRabbit
		var conn interface{ Close() error }
		if conn, err = Dial(AMQPURL(), Unique("probe")); err == nil {
			conn.Close()
		}
	}
	if err == nil {
		return
	}
	fmt.Printf("%s not reachable: %v; start it with: %s\n", what, err, start)
	if os.Getenv("CI") == "true" {
		os.Exit(1)
	}
	fmt.Println("skipping the package's tests and examples")
	os.Exit(0)
}
