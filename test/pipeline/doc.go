// Package pipeline holds tests of the whole pipeline (outbox.Add, the relay,
// the inbox) on the real services, as one process: here rather than beside
// a package, because they import every package above the ground floor.
package pipeline
