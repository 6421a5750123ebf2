package keylock_test

import (
	"context"
	"fmt"

	"github.com/flynn/discoverd/internal/keylock"
)

func Example() {
	var locks keylock.Set[string]
	ctx := context.Background()

	unlock, err := locks.Lock(ctx, "web/10.0.0.1:80")
	if err != nil {
		fmt.Println(err)
		return
	}
	// Another key is not blocked by the one held.
	other, _ := locks.Lock(ctx, "web/10.0.0.2:80")
	fmt.Println("held:", locks.Len())
	other()
	unlock()
	fmt.Println("held:", locks.Len())
	// Output:
	// held: 2
	// held: 0
}
