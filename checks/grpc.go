package checks

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/flynn/discoverd/api"
)

// probeGRPC asks the gRPC server at target ("host:port[/service]") for
// its health (grpc.health.v1.Health/Check) over a connection of its own,
// closed afterwards: SERVING passes. The connection is plaintext (the
// check runs on the agent's host network, as the TCP and HTTP ones do).
func probeGRPC(ctx context.Context, target string) error {
	addr, service := api.SplitGRPCTarget(target)
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("grpc: %w", err)
	}
	defer cc.Close()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return fmt.Errorf("grpc: %w", err)
	}
	if s := resp.GetStatus(); s != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("grpc: status %s", s)
	}
	return nil
}
