package dialer_test

import (
	"io"
	"log"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/dialer"
)

// An HTTP client that reaches the instances of the service "api" by name.
// (Tested against a real agent in package discoverd's tests.)
func ExampleNewHTTPClient() {
	client, err := discoverd.NewClient()
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	hc := dialer.NewHTTPClient(client)
	resp, err := hc.Get("http://api/status") // an online instance of "api"
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
}
