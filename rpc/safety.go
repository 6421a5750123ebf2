package rpc

import (
	"encoding"
	"encoding/gob"
	"fmt"
	"reflect"
)

// encoding/gob sizes a map it creates from the element count the peer
// sends (reflect.MakeMapWithSize) before reading a single entry, so a small
// message can make it allocate gigabytes. It reuses a map that already
// exists, though. The server therefore pre-creates every map that gob would
// decode in place (fields of the argument struct, of nested structs and of
// arrays) and refuses argument types that hold a map anywhere gob would
// create it itself (inside a slice, a map or behind a pointer).

var (
	gobDecoderType    = reflect.TypeFor[gob.GobDecoder]()
	binaryDecoderType = reflect.TypeFor[encoding.BinaryUnmarshaler]()
)

// checkArgType reports an error if values of t cannot be decoded from gob
// without letting the peer choose an allocation size.
func checkArgType(t reflect.Type) error {
	return checkType(t, true, make(map[typeCtx]bool))
}

type typeCtx struct {
	t       reflect.Type
	inPlace bool
}

func checkType(t reflect.Type, inPlace bool, seen map[typeCtx]bool) error {
	if seen[typeCtx{t, inPlace}] {
		return nil
	}
	seen[typeCtx{t, inPlace}] = true
	pt := reflect.PointerTo(t)
	if pt.Implements(gobDecoderType) || pt.Implements(binaryDecoderType) {
		return nil // decodes itself
	}
	switch t.Kind() {
	case reflect.Map:
		if !inPlace {
			return fmt.Errorf("type %v holds a map inside a slice, map or pointer, which gob would size from the peer's count", t)
		}
		if err := checkType(t.Key(), false, seen); err != nil {
			return err
		}
		return checkType(t.Elem(), false, seen)
	case reflect.Struct:
		for i := range t.NumField() {
			if f := t.Field(i); f.IsExported() {
				if err := checkType(f.Type, inPlace, seen); err != nil {
					return fmt.Errorf("field %s: %w", f.Name, err)
				}
			}
		}
	case reflect.Array:
		return checkType(t.Elem(), inPlace, seen)
	case reflect.Slice, reflect.Pointer:
		return checkType(t.Elem(), false, seen)
	}
	return nil
}

// prefillMaps creates, in v (addressable), every nil map that gob would
// decode in place, and returns them so that unfillMaps can reset the ones
// the message left empty.
func prefillMaps(v reflect.Value, filled []reflect.Value) []reflect.Value {
	if reflect.PointerTo(v.Type()).Implements(gobDecoderType) || reflect.PointerTo(v.Type()).Implements(binaryDecoderType) {
		return filled
	}
	switch v.Kind() {
	case reflect.Map:
		if v.IsNil() && v.CanSet() {
			v.Set(reflect.MakeMap(v.Type()))
			filled = append(filled, v)
		}
	case reflect.Struct:
		t := v.Type()
		for i := range t.NumField() {
			if t.Field(i).IsExported() {
				filled = prefillMaps(v.Field(i), filled)
			}
		}
	case reflect.Array:
		for i := range v.Len() {
			filled = prefillMaps(v.Index(i), filled)
		}
	}
	return filled
}

// unfillMaps sets back to nil the maps prefillMaps created that are still
// empty, so a method sees a nil map where the message had none, as with
// plain gob.
func unfillMaps(filled []reflect.Value) {
	for _, m := range filled {
		if m.Len() == 0 {
			m.SetZero()
		}
	}
}

// decodeInto decodes with read into ptr (a non-nil pointer), protecting the
// maps of the pointee when the codec is gob.
func decodeInto(codec Codec, ptr reflect.Value, read func(any) error) error {
	if codec != Gob {
		return read(ptr.Interface())
	}
	filled := prefillMaps(ptr.Elem(), nil)
	err := read(ptr.Interface())
	unfillMaps(filled)
	return err
}
