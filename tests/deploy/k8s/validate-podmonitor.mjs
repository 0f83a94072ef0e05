import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import fs from "node:fs";
const objs = JSON.parse(fs.readFileSync(0, "utf8"));
for (const o of objs) { new PodMonitor(o).validate(); }
console.log("ok", objs.length);
