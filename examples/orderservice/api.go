package main

import (
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"reflect"
	"strings"

	"github.com/google/uuid"
)

// maxBodyBytes bounds a POST /orders body; larger requests get 413.
const maxBodyBytes = 16 << 10

// maxKeyBytes bounds the Idempotency-Key header.
const maxKeyBytes = 255

// API serves the order service over HTTP:
//
//	POST /orders       place an order (JSON body; optional Idempotency-Key header)
//	GET  /orders/{id}  read one order
//
// Errors are JSON: {"error": "what is wrong and what to do"}.
type API struct {
	orders *OrderService
	log    *slog.Logger
}

// Handler returns the routes.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", a.placeOrder)
	mux.HandleFunc("GET /orders/{id}", a.getOrder)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"status":"ok"}`+"\n")
	})
	return mux
}

func (a *API) placeOrder(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("Idempotency-Key")
	if len(key) > maxKeyBytes {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("Idempotency-Key: at most %d bytes (a UUID is a good key)", maxKeyBytes))
		return
	}
	req, status, err := decodePlaceOrder(w, r)
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	// The span is the root of the order's trace: outbox.Add stores its
	// context with order.placed, and the relay and consumers continue it.
	ctx, span := otel.Tracer("orderservice").Start(r.Context(), "POST /orders", trace.WithSpanKind(trace.SpanKindServer))
	defer span.End()
	o, replayed, err := a.orders.Place(ctx, key, req)
	switch {
	case errors.Is(err, ErrKeyReused):
		writeError(w, http.StatusUnprocessableEntity, err.Error())
		return
	case err != nil:
		a.log.Error("place order", "error", err)
		writeError(w, http.StatusInternalServerError, "internal error; retry with the same Idempotency-Key")
		return
	case replayed:
		w.Header().Set("Idempotent-Replayed", "true")
		writeJSON(w, http.StatusOK, o)
	default:
		w.Header().Set("Location", "/orders/"+o.ID)
		writeJSON(w, http.StatusCreated, o)
	}
}

// decodePlaceOrder reads and validates the body: 413 when too large, 400
// when it is not one JSON object of the right shape, 422 when a value is
// wrong.
func decodePlaceOrder(w http.ResponseWriter, r *http.Request) (PlaceOrder, int, error) {
	var req PlaceOrder
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	if err == nil {
		if _, extra := dec.Token(); extra != io.EOF {
			err = errors.New("trailing data after the JSON object")
			if tooLarge(extra) {
				err = extra
			}
		}
	}
	var typeErr *json.UnmarshalTypeError
	switch {
	case err == nil:
	case tooLarge(err):
		return req, http.StatusRequestEntityTooLarge, fmt.Errorf("body is larger than %d bytes", maxBodyBytes)
	case errors.Is(err, io.EOF):
		return req, http.StatusBadRequest, errors.New(`empty body: send a JSON object such as {"customer_id": "c-1", "amount_cents": 1299, "currency": "EUR"}`)
	case errors.As(err, &typeErr) && typeErr.Field == "":
		return req, http.StatusBadRequest, fmt.Errorf("malformed JSON: the body must be a JSON object, got a JSON %s", typeErr.Value)
	case errors.As(err, &typeErr):
		want := "string"
		if typeErr.Type.Kind() == reflect.Int64 {
			want = "whole number"
		}
		return req, http.StatusBadRequest, fmt.Errorf("%s: must be a %s, got a JSON %s", typeErr.Field, want, typeErr.Value)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return req, http.StatusBadRequest, fmt.Errorf("%s; the fields are customer_id, amount_cents and currency", strings.TrimPrefix(err.Error(), "json: "))
	default:
		return req, http.StatusBadRequest, fmt.Errorf("malformed JSON: %v", err)
	}
	if err := req.Validate(); err != nil {
		return req, http.StatusUnprocessableEntity, err
	}
	return req, 0, nil
}

func tooLarge(err error) bool {
	var mbe *http.MaxBytesError
	return errors.As(err, &mbe)
}

func (a *API) getOrder(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if _, err := uuid.Parse(id); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("order id %q is not a UUID", id))
		return
	}
	o, err := a.orders.Get(r.Context(), id)
	switch {
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, fmt.Sprintf("order %s not found", id))
	case err != nil:
		a.log.Error("get order", "id", id, "error", err)
		writeError(w, http.StatusInternalServerError, "internal error")
	default:
		writeJSON(w, http.StatusOK, o)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client may be gone; nothing to do
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
