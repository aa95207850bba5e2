// Compiles every JSON Schema in schemas/json/ with Ajv's JSON Schema 2020-12 class in strict
// mode (any strict-mode warning counts as a failure too), then validates the samples given on
// stdin, [{name, event, valid}], against cloudevent.schema.json and the schema of their type.
// Prints one JSON object: {compiled, warnings, samples: [{name, valid, expected, errors}]}.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const dir = process.argv[2] ?? new URL("../../schemas/json/", import.meta.url).pathname;
const warnings = [];
const logger = { log() {}, warn: (...m) => warnings.push(m.join(" ")), error: (...m) => warnings.push(m.join(" ")) };
const ajv = new Ajv2020({ strict: true, allErrors: true, logger });
addFormats(ajv);

const compiled = {};
for (const name of readdirSync(dir).filter((n) => n.endsWith(".json")).sort()) {
  const schema = JSON.parse(readFileSync(join(dir, name), "utf8"));
  try {
    compiled[name] = ajv.compile(schema);
  } catch (error) {
    warnings.push(`${name}: ${error.message}`);
  }
}

const samples = JSON.parse(readFileSync(0, "utf8"));
const results = samples.map(({ name, event, valid: expected }) => {
  const errors = [];
  for (const schema of ["cloudevent.schema.json", `${event.type}.schema.json`]) {
    const validate = compiled[schema];
    if (!validate) {
      errors.push(`${schema}: no such schema`);
    } else if (!validate(event)) {
      errors.push(...validate.errors.map((e) => `${schema}: ${e.instancePath} ${e.message}`));
    }
  }
  return { name, valid: errors.length === 0, expected, errors };
});
console.log(JSON.stringify({ compiled: Object.keys(compiled), warnings, samples: results }));
