package etcd

// SetListRangeKeys sets the keys per range of ListServices until the
// returned func restores it. Not for parallel tests.
func SetListRangeKeys(n int) (restore func()) {
	old := listRangeKeys
	listRangeKeys = n
	return func() { listRangeKeys = old }
}
