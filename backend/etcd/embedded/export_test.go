package embedded

// StopServer stops e's etcd server as a fatal error of its own would, not
// through Close.
func (e *Server) StopServer() { e.etcd.Server.Stop() }

// ServerLogger is the embedded server's zap logger; see serverLogger.
var ServerLogger = serverLogger
