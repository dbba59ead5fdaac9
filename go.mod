module github.com/mailroom-go/mailroom

go 1.24

require (
	github.com/cenkalti/backoff/v4 v4.3.0 // indirect
	github.com/google/uuid v1.6.0 // indirect
	github.com/jmoiron/sqlx v1.4.0 // indirect
	github.com/lib/pq v1.12.3 // indirect
	github.com/rabbitmq/amqp091-go v1.16.0 // indirect
	go.uber.org/goleak v1.3.0 // indirect
)
