// Package sqlident validates and quotes the table names users configure.
//
// Table names come from configuration, never from end users, but they still
// end up inside SQL text, so anything that is not a plain identifier is
// rejected rather than escaped: no quotes, no spaces, no dots beyond one
// schema separator.
package sqlident

import (
	"fmt"
	"regexp"
	"strings"
)

// maxLen is PostgreSQL's NAMEDATALEN-1: longer names are silently truncated
// by the server, which would make two configured names collide.
const maxLen = 63

var plain = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Name is a validated, optionally schema-qualified table name.
type Name struct {
	Schema string // "" = resolved through search_path
	Table  string
}

// Parse validates "table" or "schema.table".
func Parse(s string) (Name, error) {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return Name{}, fmt.Errorf("table name %q: use \"table\" or \"schema.table\"", s)
	}
	for _, p := range parts {
		if !plain.MatchString(p) {
			return Name{}, fmt.Errorf("table name %q: %q is not a plain identifier (letters, digits and _ only, not starting with a digit)", s, p)
		}
		if len(p) > maxLen {
			return Name{}, fmt.Errorf("table name %q: %q is longer than PostgreSQL's %d-byte identifier limit", s, p, maxLen)
		}
	}
	if len(parts) == 2 {
		return Name{Schema: parts[0], Table: parts[1]}, nil
	}
	return Name{Table: parts[0]}, nil
}

// MustParse is Parse for names known at compile time.
func MustParse(s string) Name {
	n, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return n
}

// Quoted returns the name ready to be placed in SQL text: "schema"."table".
func (n Name) Quoted() string {
	if n.Schema == "" {
		return quote(n.Table)
	}
	return quote(n.Schema) + "." + quote(n.Table)
}

// Derived returns a sibling name in the same schema, e.g. an index name or
// the NOTIFY channel: table name plus suffix, validated for length.
func (n Name) Derived(suffix string) (Name, error) {
	return Parse(qualify(n.Schema, n.Table+suffix))
}

// String is the unquoted form, as the user wrote it.
func (n Name) String() string { return qualify(n.Schema, n.Table) }

func qualify(schema, table string) string {
	if schema == "" {
		return table
	}
	return schema + "." + table
}

func quote(s string) string { return `"` + s + `"` }
