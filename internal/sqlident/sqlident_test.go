package sqlident

import (
	"strings"
	"testing"
)

func TestParseAcceptsPlainAndQualified(t *testing.T) {
	for in, want := range map[string]string{
		"mailroom_outbox":       `"mailroom_outbox"`,
		"My_Events2":            `"My_Events2"`,
		"app.events":            `"app"."events"`,
		"_x." + "t":             `"_x"."t"`,
		strings.Repeat("a", 63): `"` + strings.Repeat("a", 63) + `"`,
	} {
		n, err := Parse(in)
		if err != nil {
			t.Fatalf("Parse(%q): %v", in, err)
		}
		if got := n.Quoted(); got != want {
			t.Errorf("Parse(%q).Quoted() = %s, want %s", in, got, want)
		}
		if n.String() != in {
			t.Errorf("String() = %q, want %q", n.String(), in)
		}
	}
}

func TestParseRejectsHostileNames(t *testing.T) {
	for _, in := range []string{
		"", "1abc", `a"b`, `"quoted"`, "a b", "a;drop table x", "a.b.c", ".a", "a.",
		"outbox--", "t'x", "tab\x00le", "ümlaut", strings.Repeat("a", 64), `x"; DROP SCHEMA public; --`,
	} {
		if _, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) accepted a name that is not a plain identifier", in)
		}
	}
}

func TestDerived(t *testing.T) {
	n := MustParse("app.events")
	d, err := n.Derived("_dead")
	if err != nil {
		t.Fatal(err)
	}
	if d.Quoted() != `"app"."events_dead"` {
		t.Fatalf("got %s", d.Quoted())
	}
	if _, err := MustParse(strings.Repeat("a", 60)).Derived("_dead"); err == nil {
		t.Fatal("derived name over 63 bytes accepted")
	}
}
