package mailroom_test

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// No Docker engine runs where the tests run, so the image and compose
// files are checked as files: they build with the Go that go.mod needs
// (an older image fetches a toolchain at build time, or fails with
// GOTOOLCHAIN=local), the README says that version, and the compose file
// keeps what its comment promises: RabbitMQ 4, a health check for every
// long-running service (the relay's from its image), ports on 127.0.0.1
// only, and a .dockerignore keeping the repository's history out of the
// build context.
func TestImageAndComposeFiles(t *testing.T) {
	read := func(path string) string {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(read("go.mod"))
	if m == nil {
		t.Fatal("no go line in go.mod")
	}
	goVersion := m[1]
	dockerfile := read("cmd/mailroom-relay/Dockerfile")
	if !strings.Contains(dockerfile, "ARG GO_VERSION="+goVersion+"\n") {
		t.Errorf("cmd/mailroom-relay/Dockerfile: want ARG GO_VERSION=%s, as go.mod", goVersion)
	}
	if !strings.Contains(dockerfile, "HEALTHCHECK ") {
		t.Error("cmd/mailroom-relay/Dockerfile: no HEALTHCHECK (the compose file's relays rely on it)")
	}
	if !strings.Contains(read("README.md"), "**Supported:** Go "+goVersion+" or later") {
		t.Errorf("README.md: the supported Go is not %s, as go.mod", goVersion)
	}
	if ignore := read(".dockerignore"); !regexp.MustCompile(`(?m)^\.git$`).MatchString(ignore) {
		t.Errorf(".dockerignore does not leave .git out:\n%s", ignore)
	}

	compose := read("examples/docker-compose.yml")
	for _, from := range regexp.MustCompile(`FROM golang:(\S+)-`).FindAllStringSubmatch(compose, -1) {
		if from[1] != goVersion {
			t.Errorf("examples/docker-compose.yml: FROM golang:%s, want %s as go.mod", from[1], goVersion)
		}
	}
	var file struct {
		Services map[string]struct {
			Image       string         `yaml:"image"`
			Build       map[string]any `yaml:"build"`
			Healthcheck map[string]any `yaml:"healthcheck"`
			Ports       []string       `yaml:"ports"`
			Restart     string         `yaml:"restart"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal([]byte(compose), &file); err != nil {
		t.Fatalf("examples/docker-compose.yml: %v", err)
	}
	if len(file.Services) == 0 {
		t.Fatal("examples/docker-compose.yml: no services")
	}
	for name, s := range file.Services {
		relayImage := s.Build["dockerfile"] == "cmd/mailroom-relay/Dockerfile"
		if s.Restart != "no" && s.Healthcheck == nil && !relayImage {
			t.Errorf("service %s: long-running, with no health check", name)
		}
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "127.0.0.1:") {
				t.Errorf("service %s: port %q not bound to 127.0.0.1", name, p)
			}
		}
		if strings.HasPrefix(s.Image, "rabbitmq:") && !strings.HasPrefix(s.Image, "rabbitmq:4") {
			t.Errorf("service %s: image %s, want RabbitMQ 4.x", name, s.Image)
		}
	}
	if _, ok := file.Services["rabbitmq"]; !ok {
		t.Error("examples/docker-compose.yml: no rabbitmq service")
	}
}
