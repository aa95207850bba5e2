// Reproduces every signing test vector with npm `canonicalize` (RFC 8785) and node:crypto:
// prints one JSON line per vector, {description, canonical, signature, ok}.
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import canonicalize from "canonicalize";

const path = process.argv[2] ?? new URL("../../schemas/vectors/signatures.json", import.meta.url);
const vectors = JSON.parse(readFileSync(path, "utf8"));
let failed = 0;
for (const vector of vectors) {
  const { signature: _, ...unsigned } = vector.event;
  const canonical = canonicalize(unsigned);
  const mac = createHmac("sha256", vector.key).update(canonical, "utf8").digest("hex");
  const signature = `v2=${mac}`;
  const ok = canonical === vector.canonical && signature === vector.signature;
  if (!ok) failed += 1;
  console.log(JSON.stringify({ description: vector.description, canonical, signature, ok }));
}
process.exit(failed ? 1 : 0);
