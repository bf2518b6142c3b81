// A checksum database and module proxy for tests: serves ROOT (a GOPROXY
// tree) and /sumdb/NAME/ (a record for every module version under ROOT,
// all made at start in path order, so the tree never grows while a test
// runs and every client sees the same signed tree and tiles).
package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb"
	"golang.org/x/mod/sumdb/dirhash"
	"golang.org/x/mod/sumdb/note"
)

func main() {
	addr, name, root := os.Args[1], os.Args[2], os.Args[3]
	skey, vkey, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		panic(err)
	}
	gosum := func(path, vers string) ([]byte, error) {
		esc, err := module.EscapePath(path)
		if err != nil {
			return nil, err
		}
		base := filepath.Join(root, esc, "@v", vers)
		zipHash, err := dirhash.HashZip(base+".zip", dirhash.Hash1)
		if err != nil {
			return nil, err
		}
		modHash, err := dirhash.Hash1([]string{"go.mod"}, func(string) (io.ReadCloser, error) {
			return os.Open(base + ".mod")
		})
		if err != nil {
			return nil, err
		}
		return []byte(fmt.Sprintf("%s %s %s\n%s %s/go.mod %s\n", path, vers, zipHash, path, vers, modHash)), nil
	}
	ts := sumdb.NewTestServer(skey, gosum)
	var zips []string
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".zip") && filepath.Base(filepath.Dir(p)) == "@v" {
			zips = append(zips, p)
		}
		return err
	})
	if err != nil {
		panic(err)
	}
	sort.Strings(zips)
	for _, zip := range zips {
		rel, err := filepath.Rel(root, zip)
		if err != nil {
			panic(err)
		}
		esc, file := filepath.Split(rel)
		path, err := module.UnescapePath(strings.TrimSuffix(filepath.ToSlash(esc), "/@v/"))
		if err != nil {
			panic(err)
		}
		version := strings.TrimSuffix(file, ".zip")
		if _, err := ts.Lookup(context.Background(), module.Version{Path: path, Version: version}); err != nil {
			panic(err)
		}
	}
	server := sumdb.NewServer(ts)
	prefix := "/sumdb/" + name
	http.HandleFunc(prefix+"/supported", func(w http.ResponseWriter, r *http.Request) {})
	http.Handle(prefix+"/", http.StripPrefix(prefix, server))
	http.Handle("/", http.FileServer(http.Dir(root)))
	fmt.Println(vkey)
	if err := http.ListenAndServe(addr, nil); err != nil {
		panic(err)
	}
}
