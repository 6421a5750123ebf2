package dialer_test

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/dialer"
)

// An HTTP client that reaches the instances of the service
// "example-api" by name.
func ExampleNewHTTPClient() {
	client, err := discoverd.NewClient() // $DISCOVERD, else 127.0.0.1:1111
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// An instance of the service (normally another process).
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello from", r.Host)
	}))
	defer srv.Close()
	if err := client.Register("example-api", srv.Listener.Addr().String()); err != nil {
		log.Fatal(err)
	}

	hc := dialer.NewHTTPClient(client)
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://example-api/status") // an online instance of example-api
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(resp.Status, ": ", string(body))
	// Output:
	// 200 OK: hello from example-api
}
