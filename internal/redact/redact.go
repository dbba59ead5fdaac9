// Package redact hides the secrets of connection strings — PostgreSQL and
// AMQP URLs, URLs without a scheme, key=value DSNs — wherever mailroom
// prints one or an error that may quote one: logs, errors, status pages,
// help. It parses each form rather than guessing by position, and never
// echoes what it cannot parse: that may hold a secret in an unknown place.
package redact

import (
	"errors"
	"net/url"
	"regexp"
	"sort"
	"strings"
)

// Mask replaces each secret (as url.URL.Redacted does for a password).
const Mask = "xxxxx"

// Unparsable stands for a connection string that does not parse.
const Unparsable = "(unparsable URL)"

// withheld replaces an error text when a connection string it may quote
// does not parse: where its secret is inside the text cannot be known (a
// url.Parse error quotes the input, and may quote a piece of it again).
const withheld = "details withheld: the connection string does not parse and the error may quote it (percent-encode special characters in the user and password: %40 for @, %2F for /, %25 for %)"

// minSecret is the shortest secret Text replaces wherever it occurs; a
// shorter one is hidden only inside the connection string itself, lest
// every "a" of a message become xxxxx.
const minSecret = 4

// String returns s, a connection string in any form, with every secret
// replaced by Mask: the password of a URL's user info; the value of every
// password-like key (see secretKey) in a URL's query or a key=value DSN,
// quoted or not. An unparsable s gives Unparsable. Several URLs separated
// by commas (the nodes of a cluster) are redacted each.
func String(s string) string {
	out, _, _ := parse(s)
	return out
}

// Text returns text (an error message, say) with the secrets of each
// connection string in dsns replaced by Mask, wherever they occur, whole
// or percent-decoded, and each dsn by its redacted form. When a dsn does
// not parse, the whole text is withheld.
func Text(text string, dsns ...string) string {
	for _, d := range dsns {
		if strings.TrimSpace(d) == "" {
			continue
		}
		red, secrets, ok := parse(d)
		if !ok {
			return withheld
		}
		text = strings.ReplaceAll(text, d, red)
		sort.Slice(secrets, func(i, j int) bool { return len(secrets[i]) > len(secrets[j]) })
		for _, s := range secrets {
			if len(s) >= minSecret {
				text = strings.ReplaceAll(text, s, Mask)
			}
		}
	}
	return text
}

// Error is Text for an error. errors.Is and errors.As still see err and
// its chain; errors.Unwrap does not, so a caller that prints what it
// unwraps prints nothing secret. An error with nothing to hide comes back
// as it is.
func Error(err error, dsns ...string) error {
	if err == nil {
		return nil
	}
	msg := Text(err.Error(), dsns...)
	if msg == err.Error() {
		return err
	}
	return &redacted{msg: msg, err: err}
}

type redacted struct {
	msg string
	err error
}

func (e *redacted) Error() string        { return e.msg }
func (e *redacted) Is(target error) bool { return errors.Is(e.err, target) }
func (e *redacted) As(target any) bool   { return errors.As(e.err, target) }

// secretKey reports whether a query or DSN key names a secret. It matches
// generously (hiding a harmless value costs little): password, passwd,
// pwd, sslpassword, passfile, token, access_token, secret, client_secret,
// api_key, apikey, sslkey, auth…, credentials, signature, sig.
func secretKey(k string) bool {
	k = strings.ToLower(k)
	for _, s := range []string{"pass", "pwd", "secret", "token", "key", "auth", "credential", "signature"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return k == "sig"
}

var (
	kvStart   = regexp.MustCompile(`^\s*[A-Za-z_][A-Za-z0-9_.-]*\s*=`)
	urlInList = regexp.MustCompile(`,\s*[A-Za-z][A-Za-z0-9+.-]*://`)
)

// parse returns the redacted form of s and the secrets found in it, raw
// and decoded; ok is false when s does not parse.
func parse(s string) (redacted string, secrets []string, ok bool) {
	if strings.TrimSpace(s) == "" {
		return s, nil, true
	}
	if locs := urlInList.FindAllStringIndex(s, -1); len(locs) > 0 {
		var parts []string
		start := 0
		for _, l := range locs {
			parts = append(parts, s[start:l[0]])
			start = l[0] + 1
		}
		parts = append(parts, s[start:])
		ok = true
		for i, p := range parts {
			r, sec, pok := parse(strings.TrimSpace(p))
			parts[i], secrets, ok = r, append(secrets, sec...), ok && pok
		}
		return strings.Join(parts, ","), secrets, ok
	}
	switch {
	case kvStart.MatchString(s):
		return keyValue(s)
	case strings.Contains(s, "://"):
		return urlForm(s, false)
	default: // user:password@host:5432/db
		return urlForm(s, true)
	}
}

// urlForm redacts a URL; schemeless means s starts at the user info.
func urlForm(s string, schemeless bool) (string, []string, bool) {
	src := s
	if schemeless {
		src = "//" + s
	}
	u, err := url.Parse(src)
	if err != nil || u.Opaque != "" {
		return Unparsable, nil, false
	}
	_, rest, _ := strings.Cut(src, "//")
	if u.User == nil && strings.Contains(rest, "@") {
		// An @ outside the user info: most likely a password with an
		// unencoded # or ?, which url.Parse took for the start of a
		// fragment or query ("postgres://u:123#x@host").
		return Unparsable, nil, false
	}
	var secrets []string
	if p, ok := u.User.Password(); ok {
		// The raw form as written: the user info ends at the last @ of the
		// authority, the password starts after its first colon.
		auth := rest
		if i := strings.IndexAny(auth, "/?#"); i >= 0 {
			auth = auth[:i]
		}
		if i := strings.LastIndex(auth, "@"); i >= 0 {
			if _, raw, found := strings.Cut(auth[:i], ":"); found {
				secrets = append(secrets, raw)
			}
		}
		secrets = append(secrets, p)
		u.User = url.UserPassword(u.User.Username(), Mask)
	}
	if u.RawQuery != "" {
		pairs := strings.Split(u.RawQuery, "&")
		for i, pair := range pairs {
			k, v, _ := strings.Cut(pair, "=")
			key, err := url.QueryUnescape(k)
			if err != nil {
				key = k
			}
			if v == "" || !secretKey(key) {
				continue
			}
			secrets = append(secrets, v)
			if dv, err := url.QueryUnescape(v); err == nil {
				secrets = append(secrets, dv)
			}
			pairs[i] = k + "=" + Mask
		}
		u.RawQuery = strings.Join(pairs, "&")
	}
	out := u.String()
	if schemeless {
		out = strings.TrimPrefix(out, "//")
	}
	return out, secrets, true
}

// keyValue redacts a libpq key=value connection string: key = value pairs
// separated by whitespace, a value either single-quoted (backslash escapes
// any character, spaces allowed) or running to the next whitespace.
func keyValue(s string) (string, []string, bool) {
	var b strings.Builder
	var secrets []string
	space := func(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' }
	i := 0
	for {
		j := i
		for j < len(s) && space(s[j]) {
			j++
		}
		b.WriteString(s[i:j])
		if i = j; i == len(s) {
			return b.String(), secrets, true
		}
		for j < len(s) && s[j] != '=' && !space(s[j]) {
			j++
		}
		key := s[i:j]
		for j < len(s) && space(s[j]) {
			j++
		}
		if j == len(s) || s[j] != '=' || key == "" {
			return Unparsable, nil, false
		}
		j++
		for j < len(s) && space(s[j]) {
			j++
		}
		b.WriteString(s[i:j])
		start := j
		var val strings.Builder
		quoted := j < len(s) && s[j] == '\''
		if quoted {
			j++
		}
		closed := !quoted
		for j < len(s) {
			c := s[j]
			if c == '\\' && j+1 < len(s) {
				val.WriteByte(s[j+1])
				j += 2
				continue
			}
			if quoted && c == '\'' {
				closed = true
				j++
				break
			}
			if !quoted && space(c) {
				break
			}
			val.WriteByte(c)
			j++
		}
		if !closed {
			return Unparsable, nil, false
		}
		raw := s[start:j]
		if secretKey(key) && raw != "" {
			b.WriteString(Mask)
			secrets = append(secrets, raw, val.String())
		} else {
			b.WriteString(raw)
		}
		i = j
	}
}
