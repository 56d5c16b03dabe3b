// Go net/http server and client (one binary): the server answers each POST with the body it
// got; the client POSTs random bodies over a keep-alive pool and checks every answer by sha256.
//
//	httpecho server LISTEN_ADDR
//	httpecho client URL CONNECTIONS REQUESTS SIZE   (prints one JSON line)
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

func serve(addr string) {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	log.Fatal(http.ListenAndServe(addr, nil))
}

func client(url string, conns, reqs, size int) {
	tr := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns}
	c := &http.Client{Transport: tr, Timeout: 60 * time.Second}
	var mu sync.Mutex
	res := map[string]interface{}{"ok": 0, "mismatches": 0, "bytes": 0, "errors": []string{}}
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < reqs; n++ {
				body := make([]byte, size)
				rand.Read(body)
				resp, err := c.Post(url, "application/octet-stream", bytes.NewReader(body))
				var got []byte
				if err == nil {
					got, err = io.ReadAll(resp.Body)
					resp.Body.Close()
				}
				mu.Lock()
				if err != nil {
					res["errors"] = append(res["errors"].([]string), err.Error())
				} else if sha256.Sum256(got) != sha256.Sum256(body) {
					res["mismatches"] = res["mismatches"].(int) + 1
				} else {
					res["ok"] = res["ok"].(int) + 1
					res["bytes"] = res["bytes"].(int) + 2*size
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

func main() {
	switch os.Args[1] {
	case "server":
		serve(os.Args[2])
	case "client":
		conns, _ := strconv.Atoi(os.Args[3])
		reqs, _ := strconv.Atoi(os.Args[4])
		size, _ := strconv.Atoi(os.Args[5])
		client(os.Args[2], conns, reqs, size)
	}
}
