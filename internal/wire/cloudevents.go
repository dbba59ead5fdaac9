package wire

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// CloudEvents (https://cloudevents.io, spec 1.0) over AMQP 0-9-1. In
// binary mode each context attribute is a header named prefix+attribute:
// the AMQP binding's "cloudEvents_" (DefaultCloudEventsPrefix), its older
// "cloudEvents:", or "ce-" as some SDKs expect; the data is the body and
// datacontenttype is the content_type property. In structured mode the
// body is the whole event as application/cloudevents+json.
const (
	CloudEventsSpecVersion    = "1.0"
	DefaultCloudEventsPrefix  = "cloudEvents_"
	CloudEventsStructuredType = "application/cloudevents+json"
	cloudEventsTimeFormat     = time.RFC3339Nano
)

// CloudEventsPrefixes are the header prefixes of binary mode that the
// inbox reads and the relay may write.
var CloudEventsPrefixes = []string{DefaultCloudEventsPrefix, "cloudEvents:", "ce-"}

// CloudEvent is the part of an event mailroom maps onto a message.
type CloudEvent struct {
	ID, Source, Type, Subject, DataContentType string
	Time                                       time.Time
	Data                                       []byte // structured mode: data as JSON, or data_base64 decoded
}

// CloudEventHeaders are the binary-mode headers of an event (those of its
// attributes that are set), with prefix.
func CloudEventHeaders(prefix string, e CloudEvent) map[string]string {
	h := map[string]string{prefix + "specversion": CloudEventsSpecVersion, prefix + "id": e.ID, prefix + "source": e.Source, prefix + "type": e.Type}
	if !e.Time.IsZero() {
		h[prefix+"time"] = e.Time.UTC().Format(cloudEventsTimeFormat)
	}
	if e.Subject != "" {
		h[prefix+"subject"] = e.Subject
	}
	return h
}

// ValidCloudEventsPrefix reports whether p is one of CloudEventsPrefixes.
func ValidCloudEventsPrefix(p string) bool {
	for _, q := range CloudEventsPrefixes {
		if p == q {
			return true
		}
	}
	return false
}

// CloudEventFromHeaders reads a binary-mode event from headers (value by
// name), with any of CloudEventsPrefixes; ok is false when the headers
// carry no specversion. A bad time is an error.
func CloudEventFromHeaders(get func(name string) (string, bool)) (e CloudEvent, ok bool, err error) {
	for _, p := range CloudEventsPrefixes {
		v, found := get(p + "specversion")
		if !found {
			continue
		}
		if v != CloudEventsSpecVersion {
			return e, true, fmt.Errorf("CloudEvents specversion %q: only %s is read", v, CloudEventsSpecVersion)
		}
		at := func(name string) string { s, _ := get(p + name); return s }
		e = CloudEvent{ID: at("id"), Source: at("source"), Type: at("type"), Subject: at("subject"), DataContentType: at("datacontenttype")}
		if t := at("time"); t != "" {
			if e.Time, err = time.Parse(time.RFC3339Nano, t); err != nil {
				return e, true, fmt.Errorf("CloudEvents time %q is not RFC 3339", t)
			}
		}
		return e, true, nil
	}
	return e, false, nil
}

// IsStructuredCloudEvent reports whether a content type is structured
// mode's (application/cloudevents+json, parameters allowed).
// It is on the inbox's path of every delivery: a prefix test, no parsing.
func IsStructuredCloudEvent(contentType string) bool {
	n := len(CloudEventsStructuredType)
	if len(contentType) < n || !strings.EqualFold(contentType[:n], CloudEventsStructuredType) {
		return false
	}
	rest := strings.TrimLeft(contentType[n:], " \t")
	return rest == "" || rest[0] == ';'
}

// CloudEventFromJSON reads a structured-mode event; ok is false when the
// body is a JSON object without specversion (no event).
func CloudEventFromJSON(body []byte) (e CloudEvent, ok bool, err error) {
	var s struct {
		SpecVersion     string          `json:"specversion"`
		ID              string          `json:"id"`
		Source          string          `json:"source"`
		Type            string          `json:"type"`
		Subject         string          `json:"subject"`
		DataContentType string          `json:"datacontenttype"`
		Time            string          `json:"time"`
		Data            json.RawMessage `json:"data"`
		DataBase64      string          `json:"data_base64"`
	}
	var probe struct {
		SpecVersion *json.RawMessage `json:"specversion"`
	}
	if json.Unmarshal(body, &probe) != nil || probe.SpecVersion == nil {
		return CloudEvent{}, false, nil // not an object with a specversion: no event
	}
	if err := json.Unmarshal(body, &s); err != nil {
		return CloudEvent{}, true, fmt.Errorf("a structured CloudEvent whose attributes are not strings: %v", err)
	}
	switch s.SpecVersion {
	case CloudEventsSpecVersion:
	default:
		return CloudEvent{}, true, fmt.Errorf("CloudEvents specversion %q: only %s is read", s.SpecVersion, CloudEventsSpecVersion)
	}
	e = CloudEvent{ID: s.ID, Source: s.Source, Type: s.Type, Subject: s.Subject, DataContentType: s.DataContentType}
	if s.Time != "" {
		t, err := time.Parse(time.RFC3339Nano, s.Time)
		if err != nil {
			return e, true, fmt.Errorf("CloudEvents time %q is not RFC 3339", s.Time)
		}
		e.Time = t
	}
	switch {
	case s.DataBase64 != "":
		d, err := base64.StdEncoding.DecodeString(s.DataBase64)
		if err != nil {
			return e, true, fmt.Errorf("CloudEvents data_base64 is not base64: %v", err)
		}
		e.Data = d
	case len(s.Data) > 0 && string(s.Data) != "null":
		e.Data = s.Data
		var str string
		if !IsJSON(e.DataContentType) && e.DataContentType != "" && json.Unmarshal(s.Data, &str) == nil {
			e.Data = []byte(str) // text data of a non-JSON type travels as a JSON string
		}
		if e.DataContentType == "" {
			e.DataContentType = DefaultContentType
		}
	}
	return e, true, nil
}
