package wire

import "testing"

// A key's bucket is part of the wire contract: a change would move keys to
// other partitions while their earlier messages wait in the old ones.
// (The values: FNV-1a, 32-bit, of the UTF-8 bytes, modulo 64, computed
// apart from this code.)
func TestBucketNeverChanges(t *testing.T) {
	for key, want := range map[string]string{"": "5", "order-1": "45", "customer-42": "62", "ü": "10"} {
		if got := Bucket(key); got != want {
			t.Errorf("Bucket(%q) = %s, want %s", key, got, want)
		}
	}
}
