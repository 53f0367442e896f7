// helm-render renders a Helm chart as `helm template` does, for the tests: Helm itself
// cannot be installed here (it is in no package registry), so this implements what
// Helm's engine gives templates on top of Go's text/template and sprig (both as Helm
// uses them): .Values (values.yaml, then -f files, then --set), .Release, .Chart,
// .Capabilities, .Files (Get, Glob, Lines), .Template, and the functions include, tpl,
// required, toYaml, fromYaml, toJson, fromJson, lookup (always empty, as in
// `helm template`). Templates named _*.tpl or _*.yaml are partials; NOTES.txt is not
// rendered; crds/ is printed as is with --include-crds.
//
// Usage: helm-render CHART [--name N] [--namespace NS] [-f FILE]... [--set a.b=v]...
//
//	[--include-crds]
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type options struct {
	chart, name, namespace string
	valueFiles, sets       []string
	includeCRDs            bool
}

func main() {
	opts, err := parseArgs(os.Args[1:])
	if err == nil {
		err = render(opts, os.Stdout)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helm-render: %v\n", err)
		os.Exit(1)
	}
}

func parseArgs(args []string) (options, error) {
	opts := options{name: "release-name", namespace: "default"}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		value := func() (string, error) {
			if i+1 >= len(args) {
				return "", fmt.Errorf("%s needs a value", arg)
			}
			i++
			return args[i], nil
		}
		var err error
		switch arg {
		case "--name":
			opts.name, err = value()
		case "--namespace", "-n":
			opts.namespace, err = value()
		case "-f", "--values":
			var v string
			v, err = value()
			opts.valueFiles = append(opts.valueFiles, v)
		case "--set":
			var v string
			v, err = value()
			opts.sets = append(opts.sets, v)
		case "--include-crds":
			opts.includeCRDs = true
		default:
			if strings.HasPrefix(arg, "-") || opts.chart != "" {
				return opts, fmt.Errorf("unexpected argument %q", arg)
			}
			opts.chart = arg
		}
		if err != nil {
			return opts, err
		}
	}
	if opts.chart == "" {
		return opts, errors.New("usage: helm-render CHART [--name N] [--namespace NS] " +
			"[-f FILE]... [--set a.b=v]... [--include-crds]")
	}
	return opts, nil
}

// files is Helm's .Files: every file of the chart but templates/, by relative path.
type files map[string][]byte

func (f files) Get(name string) string { return string(f[name]) }

func (f files) GetBytes(name string) []byte { return f[name] }

func (f files) Glob(pattern string) files {
	matched := files{}
	for name, data := range f {
		if ok, _ := path.Match(pattern, name); ok {
			matched[name] = data
		}
	}
	return matched
}

func (f files) Lines(name string) []string {
	return strings.Split(strings.TrimRight(string(f[name]), "\n"), "\n")
}

func render(opts options, out *os.File) error {
	chartFile, err := os.ReadFile(filepath.Join(opts.chart, "Chart.yaml"))
	if err != nil {
		return err
	}
	var chartMeta map[string]interface{}
	if err := yaml.Unmarshal(chartFile, &chartMeta); err != nil {
		return fmt.Errorf("Chart.yaml: %w", err)
	}
	values, err := loadValues(opts)
	if err != nil {
		return err
	}
	all, err := readTree(opts.chart)
	if err != nil {
		return err
	}
	chartName, _ := chartMeta["name"].(string)
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": opts.name, "Namespace": opts.namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart":        capitalized(chartMeta),
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.36.2", "Major": "1", "Minor": "36"}},
		"Files":        files{},
	}
	templates := map[string]string{}
	chartFiles := files{}
	for name, data := range all {
		if strings.HasPrefix(name, "templates/") {
			templates[chartName+"/"+name] = string(data)
		} else {
			chartFiles[name] = data
		}
	}
	top["Files"] = chartFiles

	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYaml
	funcs["fromYaml"] = fromYaml
	funcs["toJson"] = toJSON
	funcs["fromJson"] = fromJSON
	funcs["required"] = required
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	includes := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if includes[name] > 100 {
			return "", fmt.Errorf("include %q: recursion too deep", name)
		}
		includes[name]++
		defer func() { includes[name]-- }()
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("tpl: %w", err)
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return strings.ReplaceAll(buf.String(), "<no value>", ""), err
	}
	root.Funcs(funcs)
	names := make([]string, 0, len(templates))
	for name := range templates {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := root.New(name).Parse(templates[name]); err != nil {
			return err
		}
	}

	if opts.includeCRDs {
		crds := chartFiles.Glob("crds/*")
		for _, name := range sortedKeys(crds) {
			fmt.Fprintf(out, "---\n# Source: %s/%s\n%s\n", chartName, name, strings.TrimSpace(string(crds[name])))
		}
	}
	for _, name := range names {
		base := path.Base(name)
		if strings.HasPrefix(base, "_") || base == "NOTES.txt" {
			continue
		}
		scope := map[string]interface{}{}
		for k, v := range top {
			scope[k] = v
		}
		scope["Template"] = map[string]interface{}{"Name": name, "BasePath": chartName + "/templates"}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, scope); err != nil {
			return err
		}
		rendered := strings.TrimSpace(strings.ReplaceAll(buf.String(), "<no value>", ""))
		if rendered == "" {
			continue
		}
		if !strings.HasPrefix(rendered, "---") {
			rendered = "---\n" + rendered
		}
		fmt.Fprintf(out, "---\n# Source: %s\n%s\n", name, strings.TrimPrefix(rendered, "---\n"))
	}
	return nil
}

// readTree reads every regular file under dir (following symbolic links, as Helm does).
func readTree(dir string) (map[string][]byte, error) {
	all := map[string][]byte{}
	var walk func(rel string) error
	walk = func(rel string) error {
		entries, err := os.ReadDir(filepath.Join(dir, rel))
		if err != nil {
			return err
		}
		for _, entry := range entries {
			name := path.Join(rel, entry.Name())
			info, err := os.Stat(filepath.Join(dir, name))
			if err != nil {
				return err
			}
			if info.IsDir() {
				if err := walk(name); err != nil {
					return err
				}
				continue
			}
			data, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				return err
			}
			all[name] = data
		}
		return nil
	}
	return all, walk("")
}

func loadValues(opts options) (map[string]interface{}, error) {
	values := map[string]interface{}{}
	sources := append([]string{filepath.Join(opts.chart, "values.yaml")}, opts.valueFiles...)
	for i, file := range sources {
		data, err := os.ReadFile(file)
		if err != nil {
			if i == 0 && os.IsNotExist(err) {
				continue
			}
			return nil, err
		}
		var layer map[string]interface{}
		if err := yaml.Unmarshal(data, &layer); err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		merge(values, layer)
	}
	for _, set := range opts.sets {
		key, raw, ok := strings.Cut(set, "=")
		if !ok {
			return nil, fmt.Errorf("--set %q: expected key=value", set)
		}
		keys := strings.Split(key, ".")
		at := values
		for _, k := range keys[:len(keys)-1] {
			next, ok := at[k].(map[string]interface{})
			if !ok {
				next = map[string]interface{}{}
				at[k] = next
			}
			at = next
		}
		at[keys[len(keys)-1]] = scalar(raw)
	}
	return values, nil
}

// scalar types a --set value as Helm does: integers, booleans and null, else a string.
func scalar(raw string) interface{} {
	if n, err := strconv.ParseInt(raw, 10, 64); err == nil {
		return n
	}
	switch raw {
	case "true":
		return true
	case "false":
		return false
	case "null":
		return nil
	}
	return raw
}

// merge deep-merges layer into base; later layers win, maps merge key by key.
func merge(base, layer map[string]interface{}) {
	for k, v := range layer {
		if sub, ok := v.(map[string]interface{}); ok {
			if existing, ok := base[k].(map[string]interface{}); ok {
				merge(existing, sub)
				continue
			}
		}
		base[k] = v
	}
}

// capitalized gives Chart.yaml's fields as Helm does: .Chart.Name, .Chart.AppVersion...
func capitalized(meta map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range meta {
		out[strings.ToUpper(k[:1])+k[1:]] = v
	}
	return out
}

func sortedKeys(f files) []string {
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func toYaml(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func fromYaml(s string) map[string]interface{} {
	out := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &out); err != nil {
		out["Error"] = err.Error()
	}
	return out
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

func fromJSON(s string) map[string]interface{} {
	out := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		out["Error"] = err.Error()
	}
	return out
}

func required(message string, v interface{}) (interface{}, error) {
	if v == nil {
		return v, errors.New(message)
	}
	if s, ok := v.(string); ok && s == "" {
		return v, errors.New(message)
	}
	return v, nil
}
