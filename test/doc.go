// Package test groups the test-only programs that exercise mailroom from
// above: the whole pipeline (pipeline), whole-broker faults
// (brokerfaults, build tag brokerfaults, run alone) and fault injection
// (chaos, build tag chaos, run alone). The benchmark is at ../bench.
package test
