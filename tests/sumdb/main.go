// A checksum database and module proxy for tests: serves ROOT (a GOPROXY
// tree) and /sumdb/NAME/ (records made on demand from ROOT's files).
package main

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"

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
	server := sumdb.NewServer(sumdb.NewTestServer(skey, gosum))
	prefix := "/sumdb/" + name
	http.HandleFunc(prefix+"/supported", func(w http.ResponseWriter, r *http.Request) {})
	http.Handle(prefix+"/", http.StripPrefix(prefix, server))
	http.Handle("/", http.FileServer(http.Dir(root)))
	fmt.Println(vkey)
	if err := http.ListenAndServe(addr, nil); err != nil {
		panic(err)
	}
}
