// A TCP proxy written the usual Go way: io.Copy both ways between two *net.TCPConn. On Linux
// (*TCPConn).ReadFrom reads the other connection with splice(2), the I/O style sockops cannot
// accelerate on kernel 6.18 (docs/KERNEL-NOTES.md §3).
//
//	iocopy LISTEN_ADDR BACKEND_ADDR
package main

import (
	"io"
	"log"
	"net"
	"os"
)

func main() {
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("listening on %s", ln.Addr())
	for {
		down, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func(down *net.TCPConn) {
			defer down.Close()
			up, err := net.Dial("tcp", os.Args[2])
			if err != nil {
				log.Print(err)
				return
			}
			defer up.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(up, down) // splice(down -> pipe -> up)
				up.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(down, up)
			down.CloseWrite()
			<-done
		}(down.(*net.TCPConn))
	}
}
