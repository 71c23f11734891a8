package checkpoint

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
)

// LoadSignKey reads an ed25519 private key: PEM "PRIVATE KEY" (PKCS #8, as
// `openssl genpkey -algorithm ed25519` or `preemptd keygen` write it).
func LoadSignKey(path string) (ed25519.PrivateKey, error) {
	b, err := readPEM(path, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ed25519 key (make one with `preemptd keygen`)", path)
	}
	return ek, nil
}

// LoadVerifyKey reads an ed25519 public key: PEM "PUBLIC KEY" (PKIX, as
// `openssl pkey -pubout` or `preemptd keygen` write it).
func LoadVerifyKey(path string) (ed25519.PublicKey, error) {
	b, err := readPEM(path, "PUBLIC KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKIXPublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ek, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ed25519 public key (make one with `preemptd keygen`)", path)
	}
	return ek, nil
}

func readPEM(path, kind string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(raw)
	if blk == nil || blk.Type != kind {
		return nil, fmt.Errorf("%s: not a PEM %q block", path, kind)
	}
	return blk.Bytes, nil
}

// GenerateKeys writes a new ed25519 pair into dir: sign.key (0600, for the
// machines that commit) and verify.pub (for those that restore).
func GenerateKeys(dir string) (signPath, verifyPath string, err error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	p8, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return "", "", err
	}
	pk, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", "", err
	}
	signPath, verifyPath = filepath.Join(dir, "sign.key"), filepath.Join(dir, "verify.pub")
	for p := range map[string]bool{signPath: true, verifyPath: true} {
		if _, err := os.Stat(p); err == nil {
			return "", "", fmt.Errorf("%s exists; not overwriting a key", p)
		}
	}
	if err := os.WriteFile(signPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(verifyPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pk}), 0o644); err != nil {
		return "", "", err
	}
	return signPath, verifyPath, nil
}
