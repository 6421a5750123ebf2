module github.com/flynn/discoverd/api

go 1.24.0
